-- GET /bare: the bare FastAPI endpoint (no script logic beyond the report).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
