import pytest

from keepgpu.supervisor.devices import ConfigError, select, visible_devices
from keepgpu.telemetry.base import DeviceInfo, TelemetryUnavailable


def nvml_two(vendor):
    if vendor != "nvidia":
        raise TelemetryUnavailable("no amd")
    return [DeviceInfo(0, "GPU-aaa", "A"), DeviceInfo(1, "GPU-bbb", "B")]


def nothing(vendor):
    raise TelemetryUnavailable(f"{vendor} library missing")


def test_cuda_without_visible_list_pins_by_uuid():
    vis = visible_devices("cuda", env={}, lister=nvml_two)
    assert vis.entries == ["GPU-aaa", "GPU-bbb"]
    devs = select("1", vis)
    assert [(d.gpu, d.entry, d.uuid) for d in devs] == [(1, "GPU-bbb", "GPU-bbb")]


def test_visible_list_maps_ordinals_to_entries():
    vis = visible_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "3,5"}, lister=nvml_two)
    assert [d.entry for d in select("1", vis)] == ["5"]
    assert vis.uuids == [None, None], "CUDA's default order is not NVML's: unknown until READY"


def test_visible_list_trusted_under_pci_bus_order():
    env = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    vis = visible_devices("cuda", env=env, lister=nvml_two)
    assert vis.uuids == ["GPU-bbb"]
    assert select("GPU-bbb", vis)[0].entry == "1"


def test_visible_list_stops_at_minus_one_and_empty():
    vis = visible_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "0,-1,2"}, lister=nothing)
    assert vis.entries == ["0"]
    vis = visible_devices("cuda", env={"CUDA_VISIBLE_DEVICES": ""}, lister=nothing)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        select("all", vis)


def test_auto_prefers_cuda_then_fails_with_alternatives():
    assert visible_devices("auto", env={}, lister=nvml_two).engine == "cuda"
    with pytest.raises(ConfigError, match="--engine cpu.*--engine fake"):
        visible_devices("auto", env={}, lister=nothing)


def test_cuda_without_nvml_or_list_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES is unset"):
        visible_devices("cuda", env={}, lister=nothing)


def test_rocm_uses_rocr_list():
    vis = visible_devices("rocm", env={"ROCR_VISIBLE_DEVICES": "2"}, lister=nothing)
    assert (vis.vendor, vis.entries) == ("amd", ["2"])


def test_fake_count_and_uuids():
    vis = visible_devices("fake", env={"KEEPGPU_FAKE_GPUS": "3"})
    assert vis.entries == ["0", "1", "2"]
    assert len(set(vis.uuids)) == 3
    with pytest.raises(ConfigError):
        visible_devices("fake", env={"KEEPGPU_FAKE_GPUS": "many"})


@pytest.mark.parametrize(
    ("spec", "msg"),
    [("", "empty"), (" ", "empty"), ("0,", "empty entry"), ("1,1", "twice"),
     ("0,GPU-aaa", "twice"), ("2", "no GPU 2"), ("GPU-zzz", "unknown GPU id"), ("-1", "unknown")],
)
def test_bad_selections(spec, msg):
    vis = visible_devices("cuda", env={}, lister=nvml_two)
    with pytest.raises(ConfigError, match=msg):
        select(spec, vis)


def test_all_and_order_kept():
    vis = visible_devices("cuda", env={}, lister=nvml_two)
    assert [d.gpu for d in select("all", vis)] == [0, 1]
    assert [d.gpu for d in select("1,0", vis)] == [1, 0]


# --- MIG, through the real NVML lister over a fake pynvml ----------------------------------------


def _mig_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU 0 whole; GPU 1 MIG-enabled with two instances."""
    from fakes.fake_pynvml import FakeGpu, GiB, install

    parent = FakeGpu("GPU-parent")
    parent.add_mig("MIG-aaaa", mem_total=10 * GiB, mem_used=0)
    parent.add_mig("MIG-bbbb", mem_total=20 * GiB, mem_used=0)
    install(monkeypatch, FakeGpu("GPU-whole"), parent)


def test_mig_instances_are_devices_pinned_by_mig_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: only GPU-parent was listed, and a worker pinned to it cannot hold it (MIG on)."""
    from keepgpu.supervisor.procs import worker_env

    _mig_node(monkeypatch)
    vis = visible_devices("cuda", env={})  # the default lister: NVML
    assert vis.entries == ["GPU-whole", "MIG-aaaa", "MIG-bbbb"]
    assert vis.uuids == vis.entries
    devs = select("2", vis)
    assert [(d.gpu, d.entry, d.uuid) for d in devs] == [(2, "MIG-bbbb", "MIG-bbbb")]
    assert worker_env({}, vis.vendor, devs[0].entry)["CUDA_VISIBLE_DEVICES"] == "MIG-bbbb"
    assert select("MIG-aaaa", vis)[0].gpu == 1
    with pytest.raises(ConfigError, match="unknown GPU id"):
        select("GPU-parent", vis)


def test_ordinals_are_not_mapped_to_uuids_when_mig_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA counts MIG instances among its devices, so ordinal 1 is no NVML index 1."""
    _mig_node(monkeypatch)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,MIG-bbbb", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    vis = visible_devices("cuda", env=env)
    assert vis.uuids == [None, None, "MIG-bbbb"]
