-- KEYS: counters. ARGV[3] expires_at ('' none), then one delta per key.
local exp = nil
if ARGV[3] ~= '' then exp = tonumber(ARGV[3]) end
local out = {}
for i = 1, #KEYS do out[i] = add(KEYS[i], tonumber(ARGV[i + 3]), exp) end
return out
