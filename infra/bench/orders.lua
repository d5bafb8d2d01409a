-- POST /v1/orders: a unique Idempotency-Key per request, a random customer out of
-- the pre-minted tokens, two lines from two halves of the bench catalog (the same
-- distribution as the pgbench script). Env: BENCH_DIR, BENCH_TOKENS, BENCH_SKU_LO/MID/HI,
-- BENCH_RUN (key prefix), BENCH_RATE and BENCH_THREADS (optional: requests are sent at
-- BENCH_RATE per second in all, instead of as fast as the service answers).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do
  tokens[#tokens + 1] = "Bearer " .. line
end
local lo = tonumber(os.getenv("BENCH_SKU_LO"))
local mid = tonumber(os.getenv("BENCH_SKU_MID"))
local hi = tonumber(os.getenv("BENCH_SKU_HI"))
local run = os.getenv("BENCH_RUN")
local rate = tonumber(os.getenv("BENCH_RATE") or "")
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")

local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  threads[#threads + 1] = thread
end

local counter = 0
local prefix
local BODY = '{"email":"buyer@example.com","items":[{"sku":"B%d","quantity":1},{"sku":"B%d","quantity":2}],' ..
  '"shipping_address":{"name":"Ada Lovelace","line1":"1 Main St","line2":null,"city":"London",' ..
  '"postal_code":"N1 9GU","country":"GB"}}'

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  prefix = run .. "-" .. tid .. "-"
end

function request()
  counter = counter + 1
  local body = string.format(BODY, math.random(lo, mid - 1), math.random(mid, hi))
  return wrk.format("POST", "/v1/orders", {
    ["Authorization"] = tokens[math.random(#tokens)],
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, body)
end

if rate then
  -- wrk cannot pace by itself: each thread keeps a schedule of send times, Poisson
  -- arrivals of mean rate / threads, and delay() holds a connection that is ready to send
  -- until the next slot of the schedule. Open loop: a schedule that fell behind (every
  -- connection of the thread busy) is caught up by sending at once, so the achieved rate
  -- stays the target unless the service cannot take it (bench.py checks). wrk's Lua has
  -- no clock finer than a second: CLOCK_MONOTONIC through LuaJIT's ffi.
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local gap = 1000 * nthreads / rate -- mean ms between two sends of this thread
  local slot

  function delay()
    local now = now_ms()
    slot = slot or now
    local at = slot
    slot = slot - math.log(1 - math.random()) * gap
    return math.max(0, math.floor(at - now + 0.5))
  end
end
