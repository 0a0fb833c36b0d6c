-- wrk script: send each request with the next key from a file, round robin.
-- Usage: wrk ... -s benches/wrk_keys.lua URL -- KEYFILE
-- done() prints one machine-readable RESULT line.
local requests, count, next_index = {}, 0, 0

function init(args)
  for key in io.lines(args[1]) do
    if #key > 0 then
      count = count + 1
      requests[count] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. key })
    end
  end
  assert(count > 0, "no keys in " .. tostring(args[1]))
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end

function done(summary, latency, _)
  io.write(string.format("RESULT requests=%d secs=%.3f rps=%.1f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
