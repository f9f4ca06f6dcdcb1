-- The transition scripts of the status store (`fh_tasks/engines/status.py`), by name (`-- name: x`), loaded
-- once into `SCRIPTS` (`status_scripts.py`). Redis runs each one after `prelude`, the helpers they share, as
-- one script. The comments before and after a script's code are this file's; those within it are sent.
--
-- KEYS[1] is the namespace (`{fh}`); every other key is derived from it (one hash slot). ARGV[1] is the time of
-- the call, ARGV[2] the stream cap; each script then reads its own arguments from ARGV[3] on.

-- name: prelude
-- What every script starts with: its namespace, time and stream cap, and the helpers they share (key names,
-- events, state moves, chains, fencing, progress, the dashboard's record of a failed attempt, forgetting a job).
local P, NOW, MAXEV = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local function jk(id) return P .. ':job:' .. id end
local function num(v) return tonumber(v) or 0 end
local function event(id, kind, h)  -- h: the job's task, state, attempts, progress (read when not given)
  h = h or redis.call('HMGET', jk(id), 'task', 'state', 'attempts', 'progress')
  local f = {'id', id, 'task', h[1] or '', 'kind', kind, 'state', h[2] or '', 'attempt', h[3] or '0'}
  if h[4] then f[#f + 1] = 'progress'; f[#f + 1] = h[4] end
  redis.call('XADD', P .. ':events', 'MAXLEN', '~', MAXEV, '*', unpack(f))  -- its id is its time, never backwards
end
local function move(id, from, to)
  local created = redis.call('HGET', jk(id), 'created_at') or '0'
  if from then redis.call('ZREM', P .. ':state:' .. from, id) end
  redis.call('ZADD', P .. ':state:' .. to, created, id)
  redis.call('HSET', jk(id), 'state', to)
end
local function finish(id, from, to, ttl)  -- a final state: out of the due set, into the retention sweep
  move(id, from, to)
  local k = jk(id)
  redis.call('HSET', k, 'finished_at', string.format('%.6f', NOW))
  redis.call('HDEL', k, 'lease_until')
  redis.call('ZREM', P .. ':due', id)
  redis.call('ZADD', P .. ':done', NOW, id .. '|' .. (redis.call('HGET', k, 'task') or ''))
  if tonumber(ttl) > 0 then redis.call('EXPIRE', k, math.ceil(tonumber(ttl))) end
  event(id, to)
end
local function cancel_chain(id, ttl)  -- the jobs chained after one that did not succeed are cancelled
  local todo = {id}
  while #todo > 0 do
    local parent = table.remove(todo)
    local ck = P .. ':children:' .. parent
    for _, c in ipairs(redis.call('LRANGE', ck, 0, -1)) do
      if redis.call('HGET', jk(c), 'state') == 'waiting' then
        redis.call('HSET', jk(c), 'error', cjson.encode({type = 'Cancelled',
          message = 'an earlier job in its chain (' .. parent .. ') did not succeed'}))
        finish(c, 'waiting', 'cancelled', ttl)
        todo[#todo + 1] = c
      end
    end
    redis.call('DEL', ck)
  end
end
local function fenced(id, attempt)  -- the attempt still holds the running job
  local h = redis.call('HMGET', jk(id), 'state', 'attempts')
  return h[1] == 'running' and h[2] == attempt
end
local function set_progress(id, text)
  if text ~= '' and redis.call('HGET', jk(id), 'progress') ~= text then
    redis.call('HSET', jk(id), 'progress', text)
    event(id, 'progress')
  end
end
local function publishable(id)
  local h = redis.call('HMGET', jk(id), 'task', 'queue', 'args', 'timeout')
  return {id, h[1] or '', h[2] or '', h[3] or '', h[4] or ''}
end
local function failed_attempt(id, became, ttl, err)  -- the dashboard's record of a failed attempt (failure paths only)
  local h = redis.call('HMGET', jk(id), 'task', 'attempts', 'worker', 'started_at', 'error')
  local ak, ran = P .. ':attempts:' .. id, h[4] and string.format('%.6f', NOW - num(h[4])) or ''
  redis.call('ZADD', ak, NOW, cjson.encode({h[2] or '0', became, h[3] or '', h[4] or '', string.format('%.6f', NOW),
                                            err or h[5] or ''}))
  if redis.call('ZCARD', ak) > 100 then redis.call('ZREMRANGEBYRANK', ak, 0, -101) end
  if ttl and tonumber(ttl) > 0 then redis.call('EXPIRE', ak, math.ceil(tonumber(ttl))) end
  redis.call('ZADD', P .. ':failures', NOW, id .. '|' .. (h[2] or '0') .. '|' .. became .. '|' .. ran)
  redis.call('HINCRBY', P .. ':failed_attempts', h[1] or '', 1)
end
local function forget(id, task, st)  -- a finished job (or one whose record expired): record, history, index entries
  local q = redis.call('HGET', jk(id), 'queue')
  if (st or (redis.call('ZSCORE', P .. ':state:succeeded', id) and 'succeeded')) == 'succeeded' then
    redis.call('HINCRBY', P .. ':gone_succeeded', task, 1)  -- the run counters never go back
  end
  redis.call('DEL', jk(id), P .. ':children:' .. id, P .. ':attempts:' .. id)
  redis.call('ZREM', P .. ':all', id)
  redis.call('ZREM', P .. ':task:' .. task, id)
  if q then redis.call('ZREM', P .. ':queue:' .. q, id) else
    for _, x in ipairs(redis.call('SMEMBERS', P .. ':queues')) do redis.call('ZREM', P .. ':queue:' .. x, id) end
  end
  if st then redis.call('ZREM', P .. ':state:' .. st, id) else
    for _, s in ipairs({'succeeded', 'failed', 'cancelled'}) do redis.call('ZREM', P .. ':state:' .. s, id) end
  end
end

-- name: insert
-- ARGV[3] ttl of final records, ARGV[4] engine, then 11 fields per job (see StatusStore.insert).
-- A job already stored is left alone (a relay sending again). Returns, per job: id, its state, and 1 if new.
local out = {}
for i = 5, #ARGV, 11 do
  local id, task, queue, args, maxa, timeout, run_at, created, parent, due, owner =
    ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8], ARGV[i+9],
    ARGV[i+10]
  local k = jk(id)
  local st = redis.call('HGET', k, 'state')
  if st then
    out[#out + 1] = id; out[#out + 1] = st; out[#out + 1] = 0
  else
    local state = (tonumber(run_at) > tonumber(created)) and 'scheduled' or 'queued'
    local pstate = nil
    if parent ~= '' then
      pstate = redis.call('HGET', jk(parent), 'state')
      if pstate == nil or pstate == false or pstate == 'failed' or pstate == 'cancelled' then state = 'cancelled'
      elseif pstate ~= 'succeeded' then state = 'waiting' end
    end
    redis.call('HSET', k, 'id', id, 'task', task, 'queue', queue, 'args', args, 'state', state, 'attempts', 0,
               'max_attempts', maxa, 'created_at', created, 'run_at', run_at, 'lost', 0, 'engine', ARGV[4])
    if timeout ~= '' then redis.call('HSET', k, 'timeout', timeout) end
    if parent ~= '' then redis.call('HSET', k, 'parent', parent) end
    if owner ~= '' then redis.call('HSET', k, 'owner', owner) end
    redis.call('ZADD', P .. ':all', created, id)
    redis.call('ZADD', P .. ':task:' .. task, created, id)
    redis.call('ZADD', P .. ':queue:' .. queue, created, id)
    redis.call('ZADD', P .. ':state:' .. state, created, id)
    event(id, 'stored', {task, state, '0', false})
    if state == 'waiting' then redis.call('RPUSH', P .. ':children:' .. parent, id)
    elseif state == 'scheduled' then redis.call('ZADD', P .. ':due', run_at, id)
    elseif state == 'queued' then redis.call('ZADD', P .. ':due', due, id)
    else
      redis.call('HSET', k, 'error', cjson.encode({type = 'Cancelled',
        message = 'an earlier job in its chain (' .. parent .. ') did not succeed'}))
      finish(id, 'cancelled', 'cancelled', ARGV[3])
    end
    out[#out + 1] = id; out[#out + 1] = state; out[#out + 1] = 1
  end
end
return out

-- name: start
-- ARGV[3] id, [4] worker, [5] lease seconds, [6] crash attempts, [7] ttl.
-- Returns {1, attempt, max_attempts, timeout} to run; {0, why} to drop this copy; {-1, 'lost'} when the job
-- just failed for good because its workers kept dying.
local id, worker, lease, cap, ttl = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local k = jk(id)
local h = redis.call('HMGET', k, 'state', 'run_at', 'lease_until', 'attempts', 'max_attempts', 'timeout', 'task',
                     'created_at', 'progress')
local st = h[1]
if not st then return {0, 'missing'} end
local attempts, maxa = num(h[4]), num(h[5])
if st == 'running' then
  if num(h[3]) > NOW then return {0, 'running'} end
  redis.call('HINCRBY', k, 'lost', 1)
  if attempts >= math.max(cap, maxa) then
    redis.call('HSET', k, 'error', cjson.encode({type = 'WorkerLost', message = 'the worker running this job ' ..
      'stopped while it ran (its lease expired), ' .. attempts .. ' time(s)'}))
    failed_attempt(id, 'failed', ttl)
    finish(id, 'running', 'failed', ttl)
    cancel_chain(id, ttl)
    return {-1, 'lost'}
  end
  failed_attempt(id, 'queued', nil, cjson.encode({type = 'WorkerLost', message = 'the worker running this job ' ..
    'stopped while it ran (its lease expired)'}))
elseif st == 'scheduled' or st == 'retrying' then
  if num(h[2]) > NOW then  -- not due yet (a stray copy): the pump publishes it on time
    redis.call('ZADD', P .. ':due', h[2], id)
    return {0, 'not due'}
  end
elseif st ~= 'queued' then return {0, st} end
-- what move() and event() do, with the fields read above: 6 commands instead of 10 (this is every job's path)
attempts = attempts + 1
redis.call('HSET', k, 'attempts', attempts, 'state', 'running', 'started_at', string.format('%.6f', NOW),
           'worker', worker, 'lease_until', string.format('%.6f', NOW + lease))
redis.call('ZADD', P .. ':due', NOW + lease, id)
redis.call('ZREM', P .. ':state:' .. st, id)
redis.call('ZADD', P .. ':state:running', h[8] or '0', id)
event(id, 'started', {h[7], 'running', tostring(attempts), h[9]})
return {1, attempts, maxa, h[6] or ''}

-- name: renew
-- ARGV[3] lease seconds, then id, attempt pairs. Returns the pairs that no longer hold their job.
local lease, stale = tonumber(ARGV[3]), {}
for i = 4, #ARGV, 2 do
  local id, attempt = ARGV[i], ARGV[i+1]
  if fenced(id, attempt) then
    redis.call('HSET', jk(id), 'lease_until', string.format('%.6f', NOW + lease))
    redis.call('ZADD', P .. ':due', NOW + lease, id)
  else stale[#stale + 1] = id; stale[#stale + 1] = attempt end
end
return stale

-- name: progress
-- ARGV[3] on: id, attempt, text triples. Returns the stale pairs.
local stale = {}
for i = 3, #ARGV, 3 do
  if fenced(ARGV[i], ARGV[i+1]) then set_progress(ARGV[i], ARGV[i+2])
  else stale[#stale + 1] = ARGV[i]; stale[#stale + 1] = ARGV[i+1] end
end
return stale

-- name: succeed
-- ARGV[3] id, [4] attempt, [5] result, [6] last progress ('' for none), [7] ttl, [8] when a pump publishes
-- the jobs it releases unless the caller has (it pushes that back once it has).
-- Returns {accepted, then 5 fields per chained job released: id, task, queue, args, timeout}.
local id, attempt, ttl = ARGV[3], ARGV[4], ARGV[7]
if not fenced(id, attempt) then return {0} end
set_progress(id, ARGV[6])
local k = jk(id)
redis.call('HDEL', k, 'error')
if ARGV[5] ~= '' then redis.call('HSET', k, 'result', ARGV[5]) else redis.call('HDEL', k, 'result') end
finish(id, 'running', 'succeeded', ttl)
redis.call('ZADD', P .. ':ok', NOW, id)  -- the dashboard's successes per minute and run times
local out = {1}
local ck = P .. ':children:' .. id
for _, c in ipairs(redis.call('LRANGE', ck, 0, -1)) do
  if redis.call('HGET', jk(c), 'state') == 'waiting' then
    redis.call('HSET', jk(c), 'run_at', string.format('%.6f', NOW))
    redis.call('ZADD', P .. ':due', ARGV[8], c)  -- soon: the caller may read this answer late, or never
    move(c, 'waiting', 'queued')
    event(c, 'queued')
    for _, v in ipairs(publishable(c)) do out[#out + 1] = v end
  end
end
redis.call('DEL', ck)
return out

-- name: retry
-- ARGV[3] id, [4] attempt, [5] error, [6] last progress, [7] run_at, [8] when the pump publishes it
-- (run_at; or a redelivery deadline when the caller publishes it now). Returns {1, the job's 5 fields to
-- publish} when accepted, {0} when fenced out.
local id, attempt = ARGV[3], ARGV[4]
if not fenced(id, attempt) then return {0} end
set_progress(id, ARGV[6])
local k = jk(id)
redis.call('HSET', k, 'error', ARGV[5], 'run_at', ARGV[7])
failed_attempt(id, 'retrying')
redis.call('HDEL', k, 'lease_until')
redis.call('ZADD', P .. ':due', ARGV[8], id)
move(id, 'running', 'retrying')
event(id, 'retrying')
local out = {1}
for _, v in ipairs(publishable(id)) do out[#out + 1] = v end
return out

-- name: fail
-- ARGV[3] id, [4] attempt, [5] error, [6] last progress, [7] ttl. Returns 1 when accepted.
local id, attempt, ttl = ARGV[3], ARGV[4], ARGV[7]
if not fenced(id, attempt) then return 0 end
set_progress(id, ARGV[6])
redis.call('HSET', jk(id), 'error', ARGV[5])
failed_attempt(id, 'failed', ttl)
finish(id, 'running', 'failed', ttl)
cancel_chain(id, ttl)
return 1

-- name: lost
-- ARGV[3] id. A running job whose worker process is known dead: its lease ends now (unless it has ended
-- already: then a pump has published the job again, or is about to).
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'lease_until')
if h[1] ~= 'running' or num(h[2]) <= NOW then return 0 end
redis.call('HSET', jk(id), 'lease_until', string.format('%.6f', NOW))
redis.call('ZADD', P .. ':due', NOW, id)
return 1

-- name: cancel
-- ARGV[3] id, [4] ttl. A job that has not started (and the rest of its chain).
local id, ttl = ARGV[3], ARGV[4]
local st = redis.call('HGET', jk(id), 'state')
if st ~= 'queued' and st ~= 'scheduled' and st ~= 'retrying' and st ~= 'waiting' then return 0 end
redis.call('HSET', jk(id), 'error', cjson.encode({type = 'Cancelled', message = 'cancelled'}))
finish(id, st, 'cancelled', ttl)
cancel_chain(id, ttl)
return 1

-- name: cancel_running
-- ARGV[3] id, [4] ttl. A running job, cancelled (and the rest of its chain): its attempt's late
-- outcome and progress are refused by their fencing; the attempt's process stops it when it next looks.
local id, ttl = ARGV[3], ARGV[4]
if redis.call('HGET', jk(id), 'state') ~= 'running' then return 0 end
redis.call('HSET', jk(id), 'error', cjson.encode({type = 'Cancelled', message = 'cancelled while it ran'}))
finish(id, 'running', 'cancelled', ttl)
cancel_chain(id, ttl)
return 1

-- name: requeue
-- ARGV[3] id, [4] redelivery deadline. A failed or cancelled job, queued again with fresh attempts.
-- Returns the job's publishable fields, or {} when it cannot be requeued.
local id = ARGV[3]
local k = jk(id)
local st = redis.call('HGET', k, 'state')
if st ~= 'failed' and st ~= 'cancelled' then return {} end
redis.call('PERSIST', k)
redis.call('ZREM', P .. ':done', id .. '|' .. (redis.call('HGET', k, 'task') or ''))
redis.call('HSET', k, 'attempts', 0, 'lost', 0, 'run_at', string.format('%.6f', NOW))
redis.call('HDEL', k, 'finished_at', 'error', 'result', 'lease_until')
redis.call('ZADD', P .. ':due', ARGV[4], id)
move(id, st, 'queued')
event(id, 'queued')
return publishable(id)

-- name: take_due
-- ARGV[3] limit, [4] redelivery deadline. The jobs the pump must publish now: scheduled jobs and
-- retries come due, running jobs whose lease expired, queued jobs past their redelivery deadline. Each is
-- given the deadline (published again then if still not started). Returns 5 fields per job.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':due', '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local h = redis.call('HMGET', jk(id), 'state', 'lease_until')
  local st = h[1]
  if st == 'running' and num(h[2]) > NOW then redis.call('ZADD', P .. ':due', h[2], id)
  elseif st == 'running' or st == 'queued' or st == 'scheduled' or st == 'retrying' then
    redis.call('ZADD', P .. ':due', ARGV[4], id)
    for _, v in ipairs(publishable(id)) do out[#out + 1] = v end
  else redis.call('ZREM', P .. ':due', id) end
end
return out

-- name: due_at
-- ARGV[3] when, then ids: publish these later (the broker was down).
for i = 4, #ARGV do
  if redis.call('ZSCORE', P .. ':due', ARGV[i]) then redis.call('ZADD', P .. ':due', ARGV[3], ARGV[i]) end
end
return 1

-- name: prune
-- ARGV[3] before, [4] limit. Deletes finished jobs that finished before `before`; returns how many.
local n = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. ':done', '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))) do
  local sep = string.find(m, '|', 1, true)
  local id, task = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
  local st = redis.call('HGET', jk(id), 'state')
  if st == 'succeeded' or st == 'failed' or st == 'cancelled' or not st then
    forget(id, task, st)
    n = n + 1
  end
  redis.call('ZREM', P .. ':done', m)
end
return n

-- the jobs dashboard (capabilities `stats`, `admin`): reads and actions, never on a job's own path ----------------

-- name: page
-- ARGV[3] since ('' none), [4] cursor score ('' the first page), [5] cursor id, [6] limit, [7] most index
-- entries to examine, then the indexes to match ('all', 'state:s', 'task:t', 'queue:q'). Walks the smallest one
-- newest first from the cursor, keeping the ids every other index holds (ZSCORE), until limit + 1 are found, the
-- budget is spent or `since` is passed: O(log n + limit) for one index, O(log n + budget) for several.
-- Returns {next score, next id ('' '': last page), id, score, id, score...}.
local since, cs, cid = tonumber(ARGV[3]), ARGV[4], ARGV[5]
local limit, budget = tonumber(ARGV[6]), tonumber(ARGV[7])
local keys, walk, size = {}, nil, nil
for i = 8, #ARGV do
  local k = P .. ':' .. ARGV[i]
  local n = redis.call('ZCARD', k)
  keys[#keys + 1] = k
  if not size or n < size then walk, size = k, n end
end
local others = {}
for _, k in ipairs(keys) do if k ~= walk then others[#others + 1] = k end end
local pos = 0
if cs ~= '' then
  local r = redis.call('ZREVRANK', walk, cid)
  if r then pos = r + 1 else  -- the cursor's job left this index: start after its place (ties: by id, descending)
    pos = redis.call('ZCOUNT', walk, '(' .. cs, '+inf')
    for _, m in ipairs(redis.call('ZRANGE', walk, cs, cs, 'BYSCORE', 'LIMIT', 0, budget)) do
      if m > cid then pos = pos + 1 end
    end
  end
end
local out, seen, nxt = {}, 0, {'', ''}
if #others == 0 then budget = math.max(budget, limit + 1) end  -- one index: every entry examined is kept
local chunk = (#others == 0) and (limit + 1) or math.max(limit + 1, 200)
while seen < budget do
  local got = redis.call('ZREVRANGE', walk, pos, pos + math.min(budget - seen, chunk) - 1, 'WITHSCORES')
  if #got == 0 then return {'', '', unpack(out)} end
  for i = 1, #got, 2 do
    local id, sc = got[i], got[i + 1]
    if since and tonumber(sc) < since then return {'', '', unpack(out)} end
    seen = seen + 1
    local keep = true
    for _, k in ipairs(others) do if not redis.call('ZSCORE', k, id) then keep = false; break end end
    if keep then
      if #out >= 2 * limit then return {out[#out], out[#out - 1], unpack(out)} end  -- one more: there is a next page
      out[#out + 1] = id; out[#out + 1] = sc
    end
    nxt = {sc, id}
  end
  pos = pos + #got / 2
end
return {nxt[1], nxt[2], unpack(out)}  -- the budget is spent: the next page goes on from the last job examined

-- name: counts
-- ARGV[3..] tasks. Returns, per task, its jobs, then per state but `succeeded` (the bulk: what remains)
-- the state's name and, per task, its jobs in that state (ZINTERCARD walks the smaller set).
local out, tasks = {}, {}
for i = 3, #ARGV do tasks[#tasks + 1] = ARGV[i]; out[#out + 1] = redis.call('ZCARD', P .. ':task:' .. ARGV[i]) end
for _, s in ipairs({'queued', 'scheduled', 'waiting', 'running', 'retrying', 'failed', 'cancelled'}) do
  local sk = P .. ':state:' .. s
  if redis.call('ZCARD', sk) > 0 then
    out[#out + 1] = s
    for _, t in ipairs(tasks) do out[#out + 1] = redis.call('ZINTERCARD', 2, sk, P .. ':task:' .. t) end
  end
end
return out

-- name: queues
-- ARGV[3] most probes per queue, then queues. Per queue: its queued jobs, and the run_at of its oldest
-- queued job ('' when none was found within the probes: the smaller of the two indexes walked oldest first).
local cap, out, qk = tonumber(ARGV[3]), {}, P .. ':state:queued'
for i = 4, #ARGV do
  local k = P .. ':queue:' .. ARGV[i]
  local n, found, pos = redis.call('ZINTERCARD', 2, qk, k), '', 0
  local a, b = qk, k
  if redis.call('ZCARD', k) < redis.call('ZCARD', qk) then a, b = k, qk end
  while n > 0 and found == '' and pos < cap do
    local got = redis.call('ZRANGE', a, pos, pos + 199)
    if #got == 0 then break end
    for _, id in ipairs(got) do
      if redis.call('ZSCORE', b, id) then found = redis.call('HGET', jk(id), 'run_at') or ''; break end
    end
    pos = pos + #got
  end
  out[#out + 1] = n; out[#out + 1] = found
end
return out

-- name: run_times
-- ARGV[3] since, [4] most runs, then bucket bounds. The run times of the latest final runs since
-- `since`: successes (finished_at - started_at) and jobs failed for good (kept in their `failures` entry).
-- Returns the runs at most each bound long (cumulative), how many, their sum (as text).
local since, last, bounds, runs = ARGV[3], tonumber(ARGV[4]), {}, {}
for i = 5, #ARGV do bounds[#bounds + 1] = tonumber(ARGV[i]) end
local ok = redis.call('ZRANGE', P .. ':ok', '+inf', since, 'BYSCORE', 'REV', 'LIMIT', 0, last, 'WITHSCORES')
for i = 1, #ok, 2 do
  local s = redis.call('HGET', jk(ok[i]), 'started_at')
  if s then runs[#runs + 1] = {tonumber(ok[i + 1]), math.max(0, tonumber(ok[i + 1]) - tonumber(s))} end
end
local bad = redis.call('ZRANGE', P .. ':failures', '+inf', since, 'BYSCORE', 'REV', 'LIMIT', 0, last, 'WITHSCORES')
for i = 1, #bad, 2 do
  local became, ran = string.match(bad[i], '|([^|]*)|([^|]*)$')
  if became == 'failed' and tonumber(ran) then runs[#runs + 1] = {tonumber(bad[i + 1]), tonumber(ran)} end
end
table.sort(runs, function(a, b) return a[1] > b[1] end)
local le, n, sum = {}, math.min(#runs, last), 0
for b = 1, #bounds do le[b] = 0 end
for r = 1, n do
  local d = runs[r][2]
  sum = sum + d
  for b = 1, #bounds do if d <= bounds[b] then le[b] = le[b] + 1 end end
end
le[#le + 1] = n; le[#le + 1] = string.format('%.6f', sum)
return le

-- name: delete
-- ARGV[3] id. A finished job goes, with its history and index entries. Returns 1 when deleted.
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'task')
if h[1] ~= 'succeeded' and h[1] ~= 'failed' and h[1] ~= 'cancelled' then return 0 end
redis.call('ZREM', P .. ':done', id .. '|' .. (h[2] or ''))
forget(id, h[2] or '', h[1])
return 1

-- name: hold
-- ARGV[3] id. A delivered job whose queue is paused waits in `held:<queue>` (out of the due set; its message
-- is dropped) until `release`. Returns 1 when held, 0 when its queue is not paused (or it is not waiting to start).
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'queue', 'run_at')
if h[1] ~= 'queued' and h[1] ~= 'scheduled' and h[1] ~= 'retrying' then return 0 end
if redis.call('SISMEMBER', P .. ':paused', h[2] or '') == 0 then return 0 end
redis.call('ZREM', P .. ':due', id)
redis.call('ZADD', P .. ':held:' .. h[2], num(h[3]), id)
return 1

-- name: release
-- ARGV[3] queue, [4] limit. Jobs held while their queue was paused fall due (now, or at their run_at):
-- a pump publishes them. Returns how many were taken from the held set (call again until 0).
local hk = P .. ':held:' .. ARGV[3]
local ids = redis.call('ZRANGE', hk, 0, tonumber(ARGV[4]) - 1)
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', jk(id), 'state', 'run_at')
  if h[1] == 'queued' or h[1] == 'scheduled' or h[1] == 'retrying' then
    redis.call('ZADD', P .. ':due', math.max(NOW, num(h[2])), id)
  end
  redis.call('ZREM', hk, id)
end
return #ids
