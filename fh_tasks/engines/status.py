"""The status store of the broker engines (Celery, Dramatiq): every job's record in Redis, readable by any process.

Brokers keep messages, not jobs: neither engine can list, count or page jobs, keep progress, or tell a finished
job from an unknown one. So every job has a record here, written at submit time and moved by the workers:

    {ns}:job:<id>        hash: task queue args state attempts max_attempts timeout created_at run_at started_at
                         finished_at lease_until worker progress result error parent owner lost engine
    {ns}:all             zset of every job, scored by created_at (listing and paging, newest first)
    {ns}:state:<state>   zset per state, scored by created_at (listing by state; counts are ZCARDs)
    {ns}:task:<name>     zset per task, scored by created_at (listing by task; with a state: ZINTERSTORE)
    {ns}:due             zset: when a job must be (re)published: a scheduled job or a retry's run_at, a running
                         job's lease end (a worker that dies stops renewing it), a queued job's redelivery deadline
                         (a message the broker lost is published again; the copy a worker takes second is refused)
    {ns}:done            zset of finished jobs ("<id>|<task>"), scored by finished_at: the retention sweep
    {ns}:children:<id>   list of the jobs chained after this one (`fh_tasks.BackgroundTasks`)
    {ns}:events          stream of job events (XADD MAXLEN ~), read with XREAD BLOCK by `RedisFeed`; an entry's
                         id (Redis' clock in ms, never going backwards) is the event's order and time

The jobs dashboard's keys (capabilities `stats` and `admin`; see `page`, `overview`, `attempts`, `pause`):

    {ns}:queue:<queue>   zset per queue, scored by created_at (paging by queue; `insert` adds, `forget` removes)
    {ns}:ok              zset of succeeded jobs scored by finished_at (successes per minute, run times; `succeed`
                         adds, kept STATS_KEEP)
    {ns}:failures        zset of failed attempts ("<id>|<attempt>|<became>|<run seconds>") scored by when they ended
                         (failed attempts per minute; kept STATS_KEEP); written on the failure paths only
    {ns}:attempts:<id>   zset of a job's failed attempts (JSON), its history: capped, deleted with the job
    {ns}:failed_attempts, {ns}:gone_succeeded   hashes of counters per task that never go back (failed attempts in
                         all; successes of jobs pruned or deleted)
    {ns}:paused          set of paused queues; {ns}:held:<queue> zset of the jobs delivered while it was paused
    {ns}:workers         zset of worker ids by last heartbeat; {ns}:worker:<id> hash (queues, concurrency, pids...)
    {ns}:tasks, {ns}:queues   sets of the task and queue names hubs and workers announced (the overview's rows)

`{ns}` is a hash tag (default `{fh}`): every key lives in one Cluster slot. Each transition is one Lua script
(`SCRIPTS`) that reads the state, refuses a move that is backwards or fenced out (by attempt: an attempt that no
longer holds the job cannot write its outcome or progress), writes the hash, moves the index entries and appends
the event, atomically. Final records EXPIRE a day after the retention period; `prune` (called by the `Retention`
hook) deletes them and their index entries on time.

Delivery is at-least-once: a message may arrive twice (a relay re-sends after a crash, Redis redelivers past its
visibility timeout, the redelivery deadline fires). `start` lets one copy run: a job running under a live lease,
a final job and a job not due yet are refused, and the copy is dropped. A job whose worker died (its lease
expired) runs again as its next attempt, at most `CRASH_ATTEMPTS` (or `max_attempts`, if more) in all.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import QueueUnavailable
from ..events import JobEvent
from ..progress import ProgressBuffer
from ..records import JobRecord, JobState, NewJob

if TYPE_CHECKING:
    import redis

    from ..engine import Overview
    from ..records import WorkerInfo

__all__ = ["StatusStore", "RedisFeed", "Due", "Started", "CRASH_ATTEMPTS", "REDELIVER_AFTER", "connect"]

log = logging.getLogger("fh_tasks.status")

#: Attempts a job gets in all when its workers keep dying under it (or its max_attempts, if more).
CRASH_ATTEMPTS = 3
#: Seconds after which a queued job that no worker started is published again (a message the broker lost).
REDELIVER_AFTER = 3600.0
#: Seconds after which a pump publishes a chained job its parent's success released, unless the worker did.
RELEASE_GRACE = 10.0
#: Events kept in the stream (approximately): a subscriber that reconnects within them misses nothing.
MAX_EVENTS = 100_000
#: Final records expire this long after the retention period, in case no worker prunes them on time.
EXPIRE_MARGIN = 86_400.0
#: Seconds a reader's combined filter (state and task) is kept.
TMP_TTL = 10
STATES = tuple(s.value for s in JobState if s is not JobState.unknown)
# The jobs dashboard (capabilities `stats` and `admin`):
#: Index entries one page of a filtered job list examines at most (a sparse filter gives a short page, then the next).
PAGE_BUDGET = 2000
#: Seconds the successes and failed attempts behind the per-minute figures and run times are kept.
STATS_KEEP = 86_400.0
#: The latest finished jobs whose run times make the histogram (as on SQLite).
RUN_TIMES_LAST = 10_000
#: Queued jobs a queue's oldest-job search looks at, at most.
OLDEST_PROBES = 2000
#: Running jobs read to count each worker's (at most).
RUNNING_READ = 10_000
#: Seconds between two heartbeats of a worker process: "silent" after 3 missed ones, forgotten after WORKER_FORGET.
HEARTBEAT_EVERY = 1.0
WORKER_FORGET = 300.0
#: Seconds a process reuses the set of paused queues it read (a pause holds everywhere within about this long).
PAUSED_TTL = 1.0
_SUMMARY = ("id", "task", "queue", "state", "attempts", "max_attempts", "created_at", "run_at", "started_at",
            "finished_at", "progress", "error", "parent", "worker", "owner")
_NUMS = {"attempts": int, "max_attempts": int, "lost": int, "created_at": float, "run_at": float,
         "started_at": float, "finished_at": float, "timeout": float, "lease_until": float}


def connect(url: str, **kw: Any) -> redis.Redis:
    "A Redis client for `url` that answers strings, with timeouts (a down server fails fast, never hangs a request)."
    import redis
    opts: dict[str, Any] = dict(decode_responses=True, socket_connect_timeout=2.0, socket_timeout=10.0,
                                health_check_interval=30)
    return redis.Redis.from_url(url, **{**opts, **kw})


# -- the scripts ---------------------------------------------------------------------------------------------------
# KEYS[1] is the namespace (`{fh}`); every other key is derived from it (one hash slot). ARGV[1] is the time of the
# call, ARGV[2] the stream cap; each script then reads its own arguments from ARGV[3] on.
_PRELUDE = r"""
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
"""

SCRIPTS: dict[str, str] = {
    # insert: ARGV[3] ttl of final records, ARGV[4] engine, then 11 fields per job (see StatusStore.insert).
    # A job already stored is left alone (a relay sending again). Returns, per job: id, its state, and 1 if new.
    "insert": r"""
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
""",
    # start: ARGV[3] id, [4] worker, [5] lease seconds, [6] crash attempts, [7] ttl.
    # Returns {1, attempt, max_attempts, timeout} to run; {0, why} to drop this copy; {-1, 'lost'} when the job
    # just failed for good because its workers kept dying.
    "start": r"""
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
""",
    # renew: ARGV[3] lease seconds, then id, attempt pairs. Returns the pairs that no longer hold their job.
    "renew": r"""
local lease, stale = tonumber(ARGV[3]), {}
for i = 4, #ARGV, 2 do
  local id, attempt = ARGV[i], ARGV[i+1]
  if fenced(id, attempt) then
    redis.call('HSET', jk(id), 'lease_until', string.format('%.6f', NOW + lease))
    redis.call('ZADD', P .. ':due', NOW + lease, id)
  else stale[#stale + 1] = id; stale[#stale + 1] = attempt end
end
return stale
""",
    # progress: id, attempt, text triples. Returns the stale pairs.
    "progress": r"""
local stale = {}
for i = 3, #ARGV, 3 do
  if fenced(ARGV[i], ARGV[i+1]) then set_progress(ARGV[i], ARGV[i+2])
  else stale[#stale + 1] = ARGV[i]; stale[#stale + 1] = ARGV[i+1] end
end
return stale
""",
    # succeed: ARGV[3] id, [4] attempt, [5] result, [6] last progress ('' for none), [7] ttl, [8] when a pump publishes
    # the jobs it releases unless the caller has (it pushes that back once it has).
    # Returns {accepted, then 5 fields per chained job released: id, task, queue, args, timeout}.
    "succeed": r"""
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
""",
    # retry: ARGV[3] id, [4] attempt, [5] error, [6] last progress, [7] run_at, [8] when the pump publishes it
    # (run_at; or a redelivery deadline when the caller publishes it now). Returns {1, the job's 5 fields to
    # publish} when accepted, {0} when fenced out.
    "retry": r"""
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
""",
    # fail: ARGV[3] id, [4] attempt, [5] error, [6] last progress, [7] ttl. Returns 1 when accepted.
    "fail": r"""
local id, attempt, ttl = ARGV[3], ARGV[4], ARGV[7]
if not fenced(id, attempt) then return 0 end
set_progress(id, ARGV[6])
redis.call('HSET', jk(id), 'error', ARGV[5])
failed_attempt(id, 'failed', ttl)
finish(id, 'running', 'failed', ttl)
cancel_chain(id, ttl)
return 1
""",
    # lost: ARGV[3] id. A running job whose worker process is known dead: its lease ends now (unless it has ended
    # already: then a pump has published the job again, or is about to).
    "lost": r"""
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'lease_until')
if h[1] ~= 'running' or num(h[2]) <= NOW then return 0 end
redis.call('HSET', jk(id), 'lease_until', string.format('%.6f', NOW))
redis.call('ZADD', P .. ':due', NOW, id)
return 1
""",
    # cancel: ARGV[3] id, [4] ttl. A job that has not started (and the rest of its chain).
    "cancel": r"""
local id, ttl = ARGV[3], ARGV[4]
local st = redis.call('HGET', jk(id), 'state')
if st ~= 'queued' and st ~= 'scheduled' and st ~= 'retrying' and st ~= 'waiting' then return 0 end
redis.call('HSET', jk(id), 'error', cjson.encode({type = 'Cancelled', message = 'cancelled'}))
finish(id, st, 'cancelled', ttl)
cancel_chain(id, ttl)
return 1
""",
    # cancel_running: ARGV[3] id, [4] ttl. A running job, cancelled (and the rest of its chain): its attempt's late
    # outcome and progress are refused by their fencing; the attempt's process stops it when it next looks.
    "cancel_running": r"""
local id, ttl = ARGV[3], ARGV[4]
if redis.call('HGET', jk(id), 'state') ~= 'running' then return 0 end
redis.call('HSET', jk(id), 'error', cjson.encode({type = 'Cancelled', message = 'cancelled while it ran'}))
finish(id, 'running', 'cancelled', ttl)
cancel_chain(id, ttl)
return 1
""",
    # requeue: ARGV[3] id, [4] redelivery deadline. A failed or cancelled job, queued again with fresh attempts.
    # Returns the job's publishable fields, or {} when it cannot be requeued.
    "requeue": r"""
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
""",
    # take_due: ARGV[3] limit, [4] redelivery deadline. The jobs the pump must publish now: scheduled jobs and
    # retries come due, running jobs whose lease expired, queued jobs past their redelivery deadline. Each is
    # given the deadline (published again then if still not started). Returns 5 fields per job.
    "take_due": r"""
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
""",
    # due_at: ARGV[3] when, then ids: publish these later (the broker was down).
    "due_at": r"""
for i = 4, #ARGV do
  if redis.call('ZSCORE', P .. ':due', ARGV[i]) then redis.call('ZADD', P .. ':due', ARGV[3], ARGV[i]) end
end
return 1
""",
    # prune: ARGV[3] before, [4] limit. Deletes finished jobs that finished before `before`; returns how many.
    "prune": r"""
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
""",
    # -- the jobs dashboard (capabilities `stats`, `admin`): reads and actions, never on a job's own path ------------
    # page: ARGV[3] since ('' none), [4] cursor score ('' the first page), [5] cursor id, [6] limit, [7] most index
    # entries to examine, then the indexes to match ('all', 'state:s', 'task:t', 'queue:q'). Walks the smallest one
    # newest first from the cursor, keeping the ids every other index holds (ZSCORE), until limit + 1 are found, the
    # budget is spent or `since` is passed: O(log n + limit) for one index, O(log n + budget) for several.
    # Returns {next score, next id ('' '': last page), id, score, id, score...}.
    "page": r"""
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
""",
    # counts: ARGV[3..] tasks. Returns, per task, its jobs, then per state but `succeeded` (the bulk: what remains)
    # the state's name and, per task, its jobs in that state (ZINTERCARD walks the smaller set).
    "counts": r"""
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
""",
    # queues: ARGV[3] most probes per queue, then queues. Per queue: its queued jobs, and the run_at of its oldest
    # queued job ('' when none was found within the probes: the smaller of the two indexes walked oldest first).
    "queues": r"""
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
""",
    # run_times: ARGV[3] since, [4] most runs, then bucket bounds. The run times of the latest final runs since
    # `since`: successes (finished_at - started_at) and jobs failed for good (kept in their `failures` entry).
    # Returns the runs at most each bound long (cumulative), how many, their sum (as text).
    "run_times": r"""
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
""",
    # delete: ARGV[3] id. A finished job goes, with its history and index entries. Returns 1 when deleted.
    "delete": r"""
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'task')
if h[1] ~= 'succeeded' and h[1] ~= 'failed' and h[1] ~= 'cancelled' then return 0 end
redis.call('ZREM', P .. ':done', id .. '|' .. (h[2] or ''))
forget(id, h[2] or '', h[1])
return 1
""",
    # hold: ARGV[3] id. A delivered job whose queue is paused waits in `held:<queue>` (out of the due set; its message
    # is dropped) until `release`. Returns 1 when held, 0 when its queue is not paused (or it is not waiting to start).
    "hold": r"""
local id = ARGV[3]
local h = redis.call('HMGET', jk(id), 'state', 'queue', 'run_at')
if h[1] ~= 'queued' and h[1] ~= 'scheduled' and h[1] ~= 'retrying' then return 0 end
if redis.call('SISMEMBER', P .. ':paused', h[2] or '') == 0 then return 0 end
redis.call('ZREM', P .. ':due', id)
redis.call('ZADD', P .. ':held:' .. h[2], num(h[3]), id)
return 1
""",
    # release: ARGV[3] queue, [4] limit. Jobs held while their queue was paused fall due (now, or at their run_at):
    # a pump publishes them. Returns how many were taken from the held set (call again until 0).
    "release": r"""
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
""",
}


@dataclass(frozen=True, slots=True)
class Due:
    "A job to publish to the broker: its id, task, queue, arguments (JSON text) and per-job timeout."
    id: str
    task: str
    queue: str
    args: str
    timeout: float | None

    @classmethod
    def many(cls, flat: Sequence[Any]) -> list[Due]:
        return [cls(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], float(flat[i + 4]) if flat[i + 4] else None)
                for i in range(0, len(flat) - 4, 5)]


@dataclass(frozen=True, slots=True)
class Started:
    "What `start` said: `run` it as `attempt` (of `max_attempts`), or drop this copy (`why`); `lost`: failed for good."
    run: bool
    attempt: int = 0
    max_attempts: int = 0
    timeout: float | None = None
    why: str = ""
    lost: bool = False


class StatusStore:
    """Job records, indexes and events in Redis (see the module docstring); thread-safe, fork-safe (redis-py's pool
    reconnects in a child). Every write raises `QueueUnavailable` when Redis cannot be reached.

    Args:
        url: the Redis URL (`redis://host:port/db`).
        namespace: the key prefix (a hash tag, `{namespace}`): several apps, or tests, can share one Redis.
        engine: the engine's name, stored in each record.
        retention: seconds final records are kept (they expire `EXPIRE_MARGIN` later, pruned or not); None: forever.
        redeliver_after: seconds after which a queued job no worker started is published again.
    """

    def __init__(self, url: str, *, namespace: str = "fh", engine: str = "", clock: Callable[[], float] = time.time,
                 retention: float | None = None, redeliver_after: float = REDELIVER_AFTER,
                 max_events: int = MAX_EVENTS) -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be a non-empty string without braces, not {namespace!r}")
        self.url, self.namespace, self.engine, self.clock = url, namespace, engine, clock
        self.prefix = "{" + namespace + "}"
        self.retention, self.redeliver_after, self.max_events = retention, redeliver_after, max_events
        self.redis: Any = connect(url)  # a redis.Redis answering str (its stubs cannot say so)
        self._shas: dict[str, str] = {}
        self._wires: dict[tuple[int, int], _Wire] = {}
        self._progress = ProgressBuffer()
        self._lock = threading.Lock()
        self._cancelled: set[tuple[str, int]] = set()  # attempts of this process whose job was cancelled as it ran

    def __repr__(self) -> str:
        return f"StatusStore({self.url!r}, namespace={self.namespace!r})"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def _ttl(self) -> float:
        return 0.0 if self.retention is None else self.retention + EXPIRE_MARGIN

    def _call(self, script: str, *args: Any, doing: str) -> Any:
        "Run one transition script and return its answer (see `_soon`)."
        return self._soon(script, *args, doing=doing)()

    def _soon(self, script: str, *args: Any, doing: str, defer: bool = False) -> Callable[[], Any]:
        """Send one transition script now (`defer`: with the thread's next script, see `_Wire`); the function returned
        reads its answer. Scripts go over a connection of the calling thread (`_Wire`): the answers come back in
        order, so a worker can send an attempt's outcome and go on (the next `start` reads both answers). A script
        is loaded once per server, again after a restart."""
        import redis
        argv = [f"{self.clock():.6f}", self.max_events, *("" if a is None else a for a in args)]
        try:
            sha = self._shas.get(script)
            if sha is None: sha = self._shas[script] = self.redis.script_load(_PRELUDE + SCRIPTS[script])
            wire = self._wire()
            ticket = wire.send("EVALSHA", sha, 1, self.prefix, *argv, defer=defer)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: {e}") from e

        def answer() -> Any:
            try:
                try: return wire.read(ticket)
                except redis.exceptions.NoScriptError:  # Redis restarted and forgot the script: it did not run
                    self._shas[script] = self.redis.script_load(_PRELUDE + SCRIPTS[script])
                    w = self._wire()
                    return w.read(w.send("EVALSHA", self._shas[script], 1, self.prefix, *argv))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: "
                                       f"{e}") from e

        return answer

    def flush_held(self) -> None:
        "Write the outcomes this process's threads hold back for their next script (`succeed_soon(defer=True)`)."
        pid = os.getpid()
        for key, w in list(self._wires.items()):
            if key[0] == pid and w.held: w.flush()

    def _wire(self) -> _Wire:
        "This thread's connection for scripts (a new one in a forked child)."
        key = (os.getpid(), threading.get_ident())
        w = self._wires.get(key)
        if w is None:
            live = {t.ident for t in threading.enumerate()}
            for k, old in list(self._wires.items()):  # the connections of threads that ended
                if k[0] == key[0] and k[1] not in live:
                    del self._wires[k]
                    old.conn.disconnect()
            pool = self.redis.connection_pool
            # No health check: its PING would read an answer still waiting on the connection.
            kw = {**pool.connection_kwargs, "health_check_interval": 0}
            w = self._wires[key] = _Wire(pool.connection_class(**kw))
        return w

    def _read(self, fn: Callable[[], Any], doing: str) -> Any:
        import redis
        try: return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: {e}") from e

    def ping(self) -> None:
        "Raise `QueueUnavailable` unless Redis answers."
        self._read(self.redis.ping, "answer a ping")

    # -- writes ----------------------------------------------------------------------------------------------------
    def insert(self, jobs: Sequence[NewJob]) -> list[tuple[str, str, bool]]:
        """Store new jobs, all in one script; a job already stored is left as it is. Returns (id, state, new) per job:
        the caller publishes the queued ones (their redelivery deadline is set, in case it cannot)."""
        if not jobs: return []
        return _inserted(self._call("insert", *self._insert_argv(jobs), doing="store jobs"))

    def insert_soon(self, jobs: Sequence[NewJob]) -> Callable[[], list[tuple[str, str, bool]]]:
        """`insert`, sent without waiting for the answer: returns a function that waits for it (raising as `insert`
        would). The caller publishes meanwhile, so the two round trips overlap; a worker that gets the message before
        the record exists waits for it a moment (`BrokerEngine.run_job`)."""
        if not jobs: return lambda: []
        answer = self._soon("insert", *self._insert_argv(jobs), doing="store jobs")
        return lambda: _inserted(answer())

    def _insert_argv(self, jobs: Sequence[NewJob]) -> list[Any]:
        due = f"{self.clock() + self.redeliver_after:.6f}"
        argv: list[Any] = [self._ttl, self.engine]
        for j in jobs:
            argv += [j.id, j.task, j.queue, j.args, j.max_attempts, "" if j.timeout is None else repr(j.timeout),
                     f"{j.run_at:.6f}", f"{j.created_at:.6f}", j.parent or "", due, j.owner or ""]
        return argv

    def start(self, id: str, worker: str, lease: float) -> Started:
        "A worker is about to run job `id`: the next attempt under a lease, or a refusal (see the module docstring)."
        r = self._call("start", id, worker, lease, CRASH_ATTEMPTS, self._ttl, doing="start a job")
        if r[0] == 1: return Started(True, int(r[1]), int(r[2]), float(r[3]) if r[3] else None)
        return Started(False, why=str(r[1]), lost=r[0] == -1)

    def renew(self, attempts: Iterable[tuple[str, int]], lease: float) -> list[tuple[str, int]]:
        "Extend the leases of running attempts; returns those that no longer hold their job."
        argv: list[Any] = [lease]
        for id, attempt in attempts: argv += [id, attempt]
        if len(argv) == 1: return []
        stale = self._call("renew", *argv, doing="renew leases")
        return [(stale[i], int(stale[i + 1])) for i in range(0, len(stale), 2)]

    def succeed(self, id: str, attempt: int, result: str | None) -> tuple[bool, list[Due]]:
        "Record a successful attempt (with its last progress); returns (accepted, chained jobs to publish now)."
        return self.succeed_soon(id, attempt, result)()

    def succeed_soon(self, id: str, attempt: int, result: str | None, *,
                     defer: bool = False) -> Callable[[], tuple[bool, list[Due]]]:
        """`succeed`, sent now and answered later (a worker runs its next job meanwhile): returns what reads the answer.
        `defer`: sent with this thread's next script (its next job's `start`), or by `flush_held` (a keeper thread)."""
        answer = self._soon("succeed", id, attempt, result or "", self._last_progress(id, attempt), self._ttl,
                            f"{self.clock() + RELEASE_GRACE:.6f}", doing="record a result", defer=defer)

        def read() -> tuple[bool, list[Due]]:
            r = answer()
            return bool(r[0]), Due.many(r[1:])

        return read

    def retry(self, id: str, attempt: int, error: str, run_at: float, *, publish_now: bool) -> tuple[bool, Due | None]:
        """Record a failed attempt that runs again at `run_at`: published by the pump then, or (`publish_now`) by the
        caller, who gets the job to publish. Returns (accepted, the job)."""
        due = self.clock() + self.redeliver_after if publish_now else run_at
        r = self._call("retry", id, attempt, error, self._last_progress(id, attempt), f"{run_at:.6f}", f"{due:.6f}",
                       doing="record a retry")
        return bool(r[0]), (Due.many(r[1:])[0] if r[0] else None)

    def fail(self, id: str, attempt: int, error: str) -> bool:
        "Record the last failed attempt of a job: it ends failed (and the jobs chained after it are cancelled)."
        return bool(self._call("fail", id, attempt, error, self._last_progress(id, attempt), self._ttl,
                               doing="record a failure"))

    def lost(self, id: str) -> bool:
        "The worker process running job `id` died: its lease ends now, so the pump publishes it again."
        return bool(self._call("lost", id, doing="release a lost job"))

    def cancel(self, id: str) -> bool:
        return bool(self._call("cancel", id, self._ttl, doing="cancel a job"))

    def cancel_running(self, id: str) -> bool:
        "Cancel a running job (see the script); True when it was running."
        return bool(self._call("cancel_running", id, self._ttl, doing="cancel a job"))

    def cancelled_among(self, attempts: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        "The running attempts among `attempts` whose job was cancelled (`cancel_running`); each is remembered."
        if not attempts: return []
        pipe = self.redis.pipeline(transaction=False)
        for id, _ in attempts: pipe.hmget(self.key("job", id), "state", "attempts")
        rows = self._read(pipe.execute, "check for cancelled jobs")
        found = [(id, a) for (id, a), (st, n) in zip(attempts, rows, strict=True) if st == "cancelled" and n == str(a)]
        self._cancelled.update(found)
        return found

    def is_cancelled(self, id: str, attempt: int) -> bool:
        "True once this process found the attempt's job cancelled (`JobContext.cancelled` asks this; no I/O)."
        return (id, attempt) in self._cancelled

    def requeue(self, id: str) -> Due | None:
        "Queue a failed or cancelled job again with fresh attempts; returns it to publish, or None."
        r = self._call("requeue", id, f"{self.clock() + self.redeliver_after:.6f}", doing="requeue a job")
        return Due.many(r)[0] if r else None

    def take_due(self, limit: int = 500) -> list[Due]:
        "The jobs due for publishing now (see `{ns}:due`), each given a redelivery deadline."
        r = self._call("take_due", limit, f"{self.clock() + self.redeliver_after:.6f}", doing="read due jobs")
        return Due.many(r)

    def due_at(self, ids: Sequence[str], when: float) -> None:
        "Publish these jobs at `when` instead (publishing them now failed)."
        if ids: self._call("due_at", f"{when:.6f}", *ids, doing="reschedule jobs")

    def next_due(self) -> float | None:
        "When the next job falls due for publishing (None: none waits)."
        got = self._read(lambda: self.redis.zrange(self.key("due"), 0, 0, withscores=True), "read due jobs")
        return float(got[0][1]) if got else None

    def prune(self, before: float, limit: int = 1000) -> int:
        "Delete finished jobs that finished before `before`, with their index entries; returns how many."
        total = 0
        while (n := int(self._call("prune", f"{before:.6f}", limit, doing="prune jobs"))): total += n
        return total

    def prune_events(self, max_age: float = 3600.0) -> int:
        "Forget events older than `max_age` seconds (the stream is capped at `max_events` anyway)."
        minid = f"{int((self.clock() - max_age) * 1000)}-0"
        return int(self._read(lambda: self.redis.xtrim(self.key("events"), minid=minid, approximate=True),
                              "prune events"))

    # -- progress: the `ProgressSink` of `JobContext` --------------------------------------------------------------
    def record_progress(self, id: str, attempt: int, progress: str) -> bool:
        "Keep the attempt's latest progress; `flush_progress` writes it (the outcome's script writes the last one)."
        return self._progress.put((id, attempt), progress)

    def progress_pending(self) -> int:
        return len(self._progress)

    def flush_progress(self) -> int:
        "Write every pending progress value in one script; returns how many were stored (fenced by attempt)."
        with self._lock:  # an outcome takes the last value under the same lock: never an older value after it
            items = self._progress.take()
            if not items: return 0
            argv: list[Any] = []
            for (id, attempt), text in items.items(): argv += [id, attempt, text]
            try: stale = self._call("progress", *argv, doing="record progress")
            except BaseException:
                self._progress.restore(items)
                raise
        gone = [(stale[i], int(stale[i + 1])) for i in range(0, len(stale), 2)]
        self._progress.stale(gone)
        return len(items) - len(gone)

    def _last_progress(self, id: str, attempt: int) -> str:
        with self._lock:
            text = self._progress.peek([(id, attempt)]).get((id, attempt), "")
            self._progress.drop((id, attempt))
        return text

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        "The whole record, or None."
        h = self._read(lambda: self.redis.hgetall(self.key("job", id)), "read a job")
        return _record(h) if h else None

    def summary(self, id: str) -> JobRecord | None:
        "The record without its arguments and result (what a status page shows), or None."
        fields = ("id", "task", "queue", "state", "attempts", "max_attempts", "created_at", "run_at", "started_at",
                  "finished_at", "progress", "error", "parent", "worker", "owner")
        got = self._read(lambda: self.redis.hmget(self.key("job", id), fields), "read a job")
        if got[3] is None: return None
        return _record({k: v for k, v in zip(fields, got, strict=True) if v is not None})

    def timeout(self, id: str) -> float | None:
        "The job's timeout in seconds (None: none)."
        t = self._read(lambda: self.redis.hget(self.key("job", id), "timeout"), "read a job")
        return float(t) if t else None

    def exists(self, ids: Sequence[str]) -> set[str]:
        "The ids among `ids` that have a record."
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.exists(self.key("job", i))
        found = self._read(pipe.execute, "read jobs") if ids else []
        return {i for i, n in zip(ids, found, strict=True) if n}

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        "Records newest first, by state and task (a state this version does not know lists nothing)."
        if limit <= 0 or (state is not None and state not in STATES): return []
        keys = [self.key("state", state)] if state else []
        if task: keys.append(self.key("task", task))
        offset = max(0, offset)

        def page() -> list[str]:
            if len(keys) < 2:
                return list(self.redis.zrevrange(keys[0] if keys else self.key("all"), offset, offset + limit - 1))
            tmp = self.key("tmp", uuid.uuid4().hex)
            pipe = self.redis.pipeline(transaction=True)
            pipe.zinterstore(tmp, keys, aggregate="MAX")
            pipe.zrevrange(tmp, offset, offset + limit - 1)
            pipe.expire(tmp, TMP_TTL)
            return list(pipe.execute()[1])

        ids = self._read(page, "list jobs")
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.hgetall(self.key("job", i))
        rows = self._read(pipe.execute, "list jobs") if ids else []
        return [_record(h) for h in rows if h]

    def counts(self) -> dict[str, int]:
        "Jobs per state (states with none left out)."
        pipe = self.redis.pipeline(transaction=False)
        for s in STATES: pipe.zcard(self.key("state", s))
        return {s: int(n) for s, n in zip(STATES, self._read(pipe.execute, "count jobs"), strict=True) if n}

    # -- the jobs dashboard: capability `stats` ---------------------------------------------------------------------
    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[JobRecord], str | None]:
        """One page of jobs newest first (summaries), filtered, after the key `before` ("<created_at>_<id>", as the
        previous page returned it); returns the jobs and the next page's key (None: the last page). See the `page`
        script: one index is read from the key on, several are intersected within `PAGE_BUDGET` entries a page."""
        if limit <= 0 or (state is not None and state not in STATES): return [], None
        keys = [f"state:{state}"] if state else []
        if task: keys.append(f"task:{task}")
        if queue: keys.append(f"queue:{queue}")
        score, _, cid = (before or "").partition("_")
        try: float(score)
        except ValueError: score = cid = ""  # a key this store did not make: the first page
        r = self._call("page", "" if since is None else f"{since:.6f}", score, cid, limit, PAGE_BUDGET,
                       *(keys or ["all"]), doing="list jobs")
        return self._summaries(r[2::2]), (f"{r[0]}_{r[1]}" if r[0] else None)

    def _summaries(self, ids: Sequence[str]) -> list[JobRecord]:
        if not ids: return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.hmget(self.key("job", i), _SUMMARY)
        rows = self._read(pipe.execute, "list jobs")
        return [_record({k: v for k, v in zip(_SUMMARY, got, strict=True) if v is not None}) for got in rows if got[3]]

    def overview(self, window: float, tasks: Iterable[str] = (), queues: Iterable[str] = (),
                 buckets: Sequence[float] = ()) -> Overview:
        """The dashboard's figures (see `Engine.overview`). `tasks`, `queues`: names the caller knows (its hub's),
        added to those the workers announced. Counts per state and task and queue depths are exact; successes and
        failed attempts per minute come from `{ns}:ok` and `{ns}:failures` (kept `STATS_KEEP` seconds)."""
        from ..engine import Overview
        from ..records import WorkerInfo
        now = self.clock()
        since, minutes = now - window, int(window // 60)
        tasks, queues = sorted(set(tasks)), sorted(set(queues))
        p = self.redis.pipeline(transaction=False)
        if tasks: p.sadd(self.key("tasks"), *tasks)
        if queues: p.sadd(self.key("queues"), *queues)
        p.smembers(self.key("tasks"))
        p.smembers(self.key("queues"))
        p.smembers(self.key("paused"))
        p.hgetall(self.key("gone_succeeded"))
        p.hgetall(self.key("failed_attempts"))
        p.zrangebyscore(self.key("workers"), now - WORKER_FORGET, "+inf")
        p.zrange(self.key("state", "running"), 0, RUNNING_READ - 1)
        for k in ("ok", "failures"):
            for m in range(minutes): p.zcount(self.key(k), since + 60 * m, f"({since + 60 * (m + 1)}")
        got = self._read(p.execute, "read the overview")[(1 if tasks else 0) + (1 if queues else 0):]
        all_tasks, all_queues, paused = sorted(got[0]), sorted(got[1] | got[2]), frozenset(got[2])
        gone, failed = ({k: int(v) for k, v in h.items()} for h in got[3:5])
        worker_ids, running_ids = got[5:7]
        per_minute = got[7:]
        c = self._call("counts", *all_tasks, doing="count jobs") if all_tasks else []
        q = self._call("queues", OLDEST_PROBES, *all_queues, doing="count queued jobs") if all_queues else []
        rt = self._call("run_times", f"{since:.6f}", RUN_TIMES_LAST, *buckets, doing="read run times")
        p = self.redis.pipeline(transaction=False)
        for w in worker_ids: p.hgetall(self.key("worker", w))
        for i in running_ids: p.hget(self.key("job", i), "worker")
        more = self._read(p.execute, "read the overview") if worker_ids or running_ids else []
        hashes, workers_of = more[:len(worker_ids)], more[len(worker_ids):]
        return Overview(at=now, window=window, counts=_counts(all_tasks, c), paused=paused,
                        queues=[(name, int(q[2 * i]), float(q[2 * i + 1]) if q[2 * i + 1] else None)
                                for i, name in enumerate(all_queues) if int(q[2 * i])],
                        succeeded=[int(n) for n in per_minute[:minutes]], failed=[int(n) for n in per_minute[minutes:]],
                        workers=_workers(worker_ids, hashes, workers_of, now, WorkerInfo),
                        run_times=list(zip(buckets, (int(n) for n in rt[:len(buckets)]), strict=True)),
                        run_count=int(rt[-2]), run_sum=float(rt[-1]), gone_succeeded=gone, failed_attempts=failed)

    def attempts(self, id: str) -> list[dict[str, Any]]:
        "A job's failed attempts, oldest first: attempt, state (what it became), worker, started_at, ended_at, error."
        from ..records import _error
        rows = self._read(lambda: self.redis.zrange(self.key("attempts", id), 0, -1), "read a job's attempts")
        out = []
        for text in rows:
            try: a, became, worker, started, ended, err = json.loads(text)
            except ValueError: continue
            out.append({"attempt": int(a or 0), "state": became, "worker": worker or None,
                        "started_at": float(started) if started else None, "ended_at": float(ended) if ended else None,
                        "error": _error(err or None)})
        return out

    def heartbeat(self, info: WorkerInfo, pids: Sequence[int] = ()) -> None:
        """A worker process says it is alive (every `HEARTBEAT_EVERY` s): what it serves, and the processes that run its
        jobs (`pids`: the jobs whose `worker` is one of them count as its running jobs). Forgotten after
        `WORKER_FORGET` s of silence."""
        now, k = self.clock(), self.key("worker", info.id)
        p = self.redis.pipeline(transaction=False)
        p.hset(k, mapping={"host": info.host, "pid": info.pid, "queues": json.dumps(list(info.queues)),
                           "tasks": json.dumps(list(info.tasks)), "concurrency": info.concurrency, "lease": info.lease,
                           "started_at": info.started_at, "last_seen": now,
                           "pids": json.dumps(sorted({info.pid, *pids}))})
        p.expire(k, int(WORKER_FORGET))
        p.zadd(self.key("workers"), {info.id: now})
        if info.queues: p.sadd(self.key("queues"), *info.queues)
        if info.tasks: p.sadd(self.key("tasks"), *info.tasks)
        self._read(p.execute, "record a heartbeat")

    def forget_worker(self, id: str) -> None:
        "A worker stopped cleanly: it leaves the list at once."
        p = self.redis.pipeline(transaction=False)
        p.delete(self.key("worker", id))
        p.zrem(self.key("workers"), id)
        self._read(p.execute, "forget a worker")

    def trim_stats(self) -> None:
        "Forget successes and failed attempts older than `STATS_KEEP`, and workers silent for `WORKER_FORGET`."
        now = self.clock()
        p = self.redis.pipeline(transaction=False)
        for k in ("ok", "failures"): p.zremrangebyscore(self.key(k), "-inf", f"({now - STATS_KEEP}")
        p.zremrangebyscore(self.key("workers"), "-inf", f"({now - WORKER_FORGET}")
        self._read(p.execute, "trim the dashboard's figures")

    # -- capability `admin` ----------------------------------------------------------------------------------------
    def delete(self, id: str) -> bool:
        "Delete a finished job (its record, history and index entries); False when it is not finished or not there."
        return bool(self._call("delete", id, doing="delete a job"))

    def requeue_failed(self, task: str, batch: int = 500) -> list[Due]:
        "Queue every failed job of `task` again, with fresh attempts (as `requeue`); returns them, to publish."
        out: list[Due] = []
        score = cid = ""
        while True:
            r = self._call("page", "", score, cid, batch, PAGE_BUDGET, "state:failed", f"task:{task}",
                           doing="requeue failed jobs")
            for i in r[2::2]:
                if (due := self.requeue(i)) is not None: out.append(due)
            if not r[0]: return out
            score, cid = r[0], r[1]

    def pause(self, queue: str) -> None:
        "Workers start no job of `queue` (a job delivered meanwhile is held: see `hold`) until `resume`."
        self._read(lambda: self.redis.sadd(self.key("paused"), queue), "pause a queue")
        self.paused(fresh=True)

    def resume(self, queue: str) -> int:
        "Workers start jobs of `queue` again; the jobs held meanwhile fall due (a pump publishes them); how many."
        self._read(lambda: self.redis.srem(self.key("paused"), queue), "resume a queue")
        self.paused(fresh=True)
        n = 0
        while (got := int(self._call("release", queue, 1000, doing="resume a queue"))): n += got
        return n

    def paused(self, fresh: bool = False) -> frozenset[str]:
        """The paused queues, read at most once per `PAUSED_TTL` per process (`fresh`: now): a worker pays nothing for
        pausing while no queue is paused."""
        t = time.monotonic()
        cached = getattr(self, "_paused", None)
        if cached is None or fresh or t - cached[0] >= PAUSED_TTL:
            got = self._read(lambda: self.redis.smembers(self.key("paused")), "read paused queues")
            cached = self._paused = (t, frozenset(got))
        return cached[1]

    def hold(self, id: str) -> bool:
        "Job `id` was delivered while its queue is paused: keep it, without running it, until `resume`. True: held."
        return bool(self._call("hold", id, doing="hold a job of a paused queue"))

    def held_queued(self) -> int:
        "Queued jobs held in paused queues (a burst worker's idle check leaves them out)."
        paused = self.paused()
        if not paused: return 0
        p = self.redis.pipeline(transaction=False)
        for q in paused: p.zintercard(2, [self.key("held", q), self.key("state", "queued")])
        return sum(int(n) for n in self._read(p.execute, "count held jobs"))

    def feed(self) -> RedisFeed:
        return RedisFeed(self)

    def clear(self) -> int:
        "Delete every key of this namespace (tests; a store being retired); returns how many."
        n = 0
        for batch in _chunks(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000), 500):
            n += int(self.redis.unlink(*batch))
        return n

    def close(self) -> None:
        for key, w in list(self._wires.items()):
            if key[0] == os.getpid(): w.conn.disconnect()
        self._wires.clear()
        self.redis.close()


class _Wire:
    """One connection used by one thread for transition scripts, pipelined: `send` writes a command and returns a
    ticket, `read(ticket)` reads the answers in order up to that ticket's (keeping the earlier ones for their own
    `read`). `send(..., defer=True)` holds the command back until the next `send`, `read` or `flush`, which write it
    in the same system call (a worker's success goes out with its next job's `start`: one write per job instead of
    two). Thread-safe: another thread (a worker's keeper) may read an answer or flush. A broken connection fails
    every command waiting on it and reconnects on the next `send`."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.waiting: collections.deque[int] = collections.deque()
        self.answers: dict[int, tuple[bool, Any]] = {}
        self.next = 0
        self.unsent: list[Any] = []  # the packed commands held back by `send(defer=True)`...
        self.held = 0                # ...and how many they are (the last ones of `waiting`)

    def send(self, *args: Any, defer: bool = False) -> int:
        with self.lock:
            packed = self.conn.pack_command(*args)
            if defer:
                self.unsent += packed
                self.held += 1
            else: self._write(packed)
            self.next += 1
            self.waiting.append(self.next)
            return self.next

    def flush(self) -> None:
        "Write the commands held back by `send(defer=True)`, if any."
        with self.lock:
            if self.held: self._write([])

    def _write(self, packed: list[Any]) -> None:
        import redis
        if len(self.waiting) == self.held and getattr(self.conn, "_sock", None) is not None:
            # Idle, yet readable: the server closed it (a restart) or it holds stray data. As the pool does on
            # checkout, reconnect rather than send a command that would be lost (held commands were never sent).
            try: stale = self.conn.can_read(timeout=0)
            except (redis.exceptions.ConnectionError, OSError): stale = True
            if stale: self.conn.disconnect()
        chunks, self.unsent, self.held = self.unsent + packed, [], 0
        try: self.conn.send_packed_command([b"".join(chunks)] if len(chunks) > 1 else chunks)  # one system call
        except BaseException:
            self._broken()
            raise

    def read(self, ticket: int) -> Any:
        import redis
        with self.lock:
            if ticket > self.next - self.held: self._write([])  # held back: written now
            while ticket not in self.answers:
                if not self.waiting: raise redis.exceptions.ConnectionError("the answer was lost with its connection")
                t = self.waiting.popleft()
                try: self.answers[t] = (True, self.conn.read_response())
                except redis.exceptions.ResponseError as e: self.answers[t] = (False, e)
                except BaseException:
                    self._broken()
                    raise
            ok, value = self.answers.pop(ticket)
        if not ok: raise value
        return value

    def _broken(self) -> None:
        "Drop the connection and every answer still expected on it."
        self.waiting.clear()
        self.unsent, self.held = [], 0
        self.conn.disconnect()


class RedisFeed:
    """The `EventFeed` of a status store: a thread reads the events stream with XREAD BLOCK from the last entry it
    saw, so a connection that drops and comes back misses nothing (within the stream's cap)."""

    BLOCK_MS = 500

    def __init__(self, store: StatusStore) -> None:
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, publish: Callable[[list[JobEvent]], None]) -> None:
        if self._thread is not None: return
        key = self.store.key("events")
        try: last = next(iter(self.store.redis.xrevrange(key, count=1)), (f"{int(time.time() * 1000)}-0",))[0]
        except Exception: last = f"{int(time.time() * 1000)}-0"  # Redis down: events from now on, once it is back
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(publish, key, last), name="fh-tasks-events",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        th, self._thread = self._thread, None
        if th is None: return
        self._stop.set()
        if th is not threading.current_thread(): th.join(5)

    def _run(self, publish: Callable[[list[JobEvent]], None], key: str, last: str) -> None:
        r: Any = connect(self.store.url, socket_timeout=self.BLOCK_MS / 1000 + 5,
                         client_name=f"fh-tasks-events-{self.store.namespace}")
        try:
            while not self._stop.is_set():
                try: got = r.xread({key: last}, count=1000, block=self.BLOCK_MS)
                except Exception:
                    log.warning("reading job events from %s failed; trying again", _safe(self.store.url), exc_info=True)
                    self._stop.wait(0.5)
                    continue
                for _, entries in got or ():
                    if not entries: continue
                    last = entries[-1][0]
                    publish([_event(eid, f) for eid, f in entries])
        finally:
            r.close()


def _inserted(out: Sequence[Any]) -> list[tuple[str, str, bool]]:
    return [(out[i], out[i + 1], bool(out[i + 2])) for i in range(0, len(out), 3)]


def _event(eid: str, f: dict[str, str]) -> JobEvent:
    "An event from a stream entry: its id (Redis' milliseconds, then a counter) gives its order and its time."
    ms, _, n = eid.partition("-")
    return JobEvent(int(ms) << 20 | int(n or 0), f.get("id", ""), f.get("task", ""), f.get("kind", ""),
                    f.get("state", ""), int(f.get("attempt") or 0), _json(f.get("progress")), int(ms) / 1000)


def _json(text: str | None) -> Any:
    if text is None: return None
    try: return json.loads(text)
    except ValueError: return text


def _record(h: dict[str, Any]) -> JobRecord:
    "A hash as the row `JobRecord.from_row` reads: numbers as numbers (what is not a number stays as stored)."
    row: dict[str, Any] = dict(h)
    for k, kind in _NUMS.items():
        v = row.get(k)
        if isinstance(v, str):
            try: row[k] = kind(v) if kind is float else int(float(v))
            except ValueError: pass
    return JobRecord.from_row(row)


def _counts(tasks: Sequence[str], flat: Sequence[Any]) -> list[tuple[str, str, int]]:
    "(task, state, jobs) from the `counts` script's answer: `succeeded` is what the other states leave of a task."
    totals = dict(zip(tasks, (int(n) for n in flat[:len(tasks)]), strict=True))
    out: dict[tuple[str, str], int] = {}
    i = len(tasks)
    while i < len(flat):
        state = str(flat[i])
        for t, n in zip(tasks, flat[i + 1:i + 1 + len(tasks)], strict=True):
            if int(n): out[(t, state)] = int(n)
        i += 1 + len(tasks)
    for t, n in totals.items():
        rest = n - sum(v for (task, _), v in out.items() if task == t)
        if rest > 0: out[(t, "succeeded")] = rest
    return sorted((t, s, n) for (t, s), n in out.items())


def _workers(ids: Sequence[str], hashes: Sequence[dict[str, str]], running: Sequence[str | None], now: float,
             info: Any) -> list[tuple[Any, int]]:
    "The workers that sent a heartbeat lately, each with the running jobs of its processes."
    per: collections.Counter[str] = collections.Counter(w for w in running if w)
    out = []
    for id, h in zip(ids, hashes, strict=True):
        if not h: continue
        try:
            pids = [int(p) for p in json.loads(h.get("pids") or "[]")]
            w = info(id=id, host=h.get("host", ""), pid=int(h.get("pid") or 0),
                     queues=tuple(json.loads(h.get("queues") or "[]")), tasks=tuple(json.loads(h.get("tasks") or "[]")),
                     concurrency=int(h.get("concurrency") or 0), lease=float(h.get("lease") or 0),
                     started_at=float(h.get("started_at") or 0), last_seen=float(h.get("last_seen") or 0))
        except (ValueError, TypeError): continue
        w.live = now - w.last_seen <= 3 * HEARTBEAT_EVERY + 1
        out.append((w, sum(per[f"{w.host}:{p}"] for p in pids)))
    return sorted(out, key=lambda x: x[0].started_at)


def _chunks(it: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n: yield batch; batch = []
    if batch: yield batch


def _safe(url: str) -> str:
    "A URL without its password, for messages."
    scheme, sep, rest = url.partition("://")
    if "@" in rest: rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


_name = (0, "")


def worker_name() -> str:
    "How this process names itself in `worker` fields: host:pid."
    global _name
    if _name[0] != os.getpid():
        import socket
        _name = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}")
    return _name[1]
