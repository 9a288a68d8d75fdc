-- Jobs whose lease deadline has passed by the server's clock.    KEYS: leased index, running index    ARGV: limit
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for _, index in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. now, 'LIMIT', 0, ARGV[1])) do
    out[#out + 1] = id
  end
end
return out
