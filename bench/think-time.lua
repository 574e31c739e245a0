-- wrk script: each connection waits 1 ms between a response and its next
-- request, so the load is fixed by the client (about 40,000 requests a
-- second at -c64) instead of by how fast the server answers. bench.py's
-- "fixed load" serving settings use it.
delay = function()
  return 1
end
