"""keepgpu-mcp: an MCP server for AI agents (needs the `mcp` extra). See keepgpu.mcp.server.

Nothing is imported here: `import keepgpu.mcp` stays cheap, and without the SDK only the entry
point says what is missing.
"""
