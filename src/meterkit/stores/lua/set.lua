-- KEYS[1]: the counter. ARGV[3] value, ARGV[4] expires_at ('' none).
local exp = nil
if ARGV[4] ~= '' then exp = tonumber(ARGV[4]) end
put(KEYS[1], tonumber(ARGV[3]), exp)
return 1
