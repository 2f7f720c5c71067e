"""SGLang servers as rollout engine and served teacher: engine, HTTP client, server lifecycle, weight sync, CPU shim."""
