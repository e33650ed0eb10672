"""`python -m keepgpu.mcp`: the `keepgpu-mcp` server on stdio."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        import mcp.server.mcpserver  # noqa: F401 - only to say clearly that the extra is missing
    except ImportError:
        print("keepgpu-mcp: error: the MCP SDK is not installed: pip install 'keepgpu[mcp]'",
              file=sys.stderr)
        sys.exit(78)
    from keepgpu.mcp.server import main as serve

    serve()


if __name__ == "__main__":
    main()
