-- wrk script for bench/run.py: adds the API key header (from BENCH_API_KEY, if set) and, when done,
-- prints one line "BENCH_JSON {...}" with the counts and the latency percentiles (microseconds).
local api_key = os.getenv("BENCH_API_KEY")
local key_header = os.getenv("BENCH_API_KEY_HEADER") or "X-Api-Key"

wrk.method = "GET"
wrk.headers["Accept"] = "application/json"
if api_key ~= nil and api_key ~= "" then
  wrk.headers[key_header] = api_key
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
