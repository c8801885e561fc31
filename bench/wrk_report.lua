-- wrk script for bench/run.py: adds the API key header (from BENCH_API_KEY, if set), the method and body
-- (BENCH_METHOD, BENCH_BODY, BENCH_CONTENT_TYPE), the paths (BENCH_PATHS) and, when done, prints one line "BENCH_JSON {...}" with the
-- counts and the latency percentiles (microseconds).
local api_key = os.getenv("BENCH_API_KEY")
local key_header = os.getenv("BENCH_API_KEY_HEADER") or "X-Api-Key"
local body = os.getenv("BENCH_BODY")

wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.headers["Accept"] = "application/json"
if api_key ~= nil and api_key ~= "" then
  wrk.headers[key_header] = api_key
end
if body ~= nil and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
end

-- BENCH_PATHS (space-separated): the requests cycle through these paths instead of the URL's.
local paths = {}
for path in string.gmatch(os.getenv("BENCH_PATHS") or "", "%S+") do
  paths[#paths + 1] = path
end
local next_path = 0
if #paths > 0 then
  request = function()
    next_path = next_path % #paths + 1
    return wrk.format(nil, paths[next_path])
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
