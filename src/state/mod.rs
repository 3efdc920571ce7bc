//! Shared state for replicas (`[state] backend = "redis"`): the per-conversation gates and the
//! global and route caps as leased semaphores in Redis, and the conversation view's cut and
//! per-message counts, so that a conversation whose calls land on different replicas is
//! serialised as on one, and gets the same cut on each.
//!
//! With the memory backend (the default) there is no [`State`] and nothing here runs.
//!
//! **Semaphores.** One per conversation (`max_concurrent_per_conversation` slots), one per
//! capped route, one global. Each is three keys under one hash tag: the holders (a sorted set of lease ids scored by expiry, in Redis's clock), the
//! waiters (lease ids scored by arrival, from a counter) and the waiters' expiries. A Lua
//! script ([`ACQUIRE`]) runs atomically on the server: it drops expired holders and waiters,
//! then grants the slot to a caller that is first in line (or finds no line and a free slot),
//! queues a new caller (or refuses it when the line is `max_queue_per_conversation` long), and
//! keeps a waiter's place while it polls. Waiters poll with a short back-off (1 ms doubling to
//! 25 ms) until granted or their `queue_timeout` ends. A granted lease expires after
//! `lease_ttl` unless renewed; the holder renews it every third of that while the call runs,
//! and releases it ([`RELEASE`]) when the call ends. A replica that dies holding a lease loses
//! it at expiry; one that dies waiting loses its place.
//!
//! One Redis (or a primary with replicas behind one address): Redis Cluster is not supported
//! (`ACQUIRE_ALL` and `RELEASE` touch several semaphores' keys at once, and the connection does
//! not follow cluster redirects).
//!
//! **Faults.** Every round trip is bounded by `state.timeout`. A failed or slow one turns the
//! replica to its in-memory gates and view (`on_error = "local"`, counted and logged once) or
//! to refusing calls (`"reject"`), and a probe tries Redis every 500 ms (a write and a script
//! call, so that a Redis that answers PING but refuses writes — full under `noeviction`,
//! read-only after a failover, scripts denied by an ACL — is not taken for a recovered one);
//! when both succeed the replica goes back. Leases held when Redis went away are not lost track of: their
//! renewals fail quietly and Redis expires them.
//!
//! **The view.** See [`shared`]: after a call is pruned its conversation's fingerprints,
//! counts and cut are written under `{prefix}{conversation}:view`; a replica whose own copy is
//! not the latest writer's adopts it before pruning.

pub mod shared;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::time::Instant;

use crate::config::{OnStateError, StateBackend, StateSettings};
use crate::metrics::Metrics;

/// Grants, queues or refuses; keeps a waiter's place. Returns 1 (granted), 0 (waiting) or -1
/// (the line is full).
///
/// KEYS: holders, waiters, waiter expiries, arrival counter.
/// ARGV: lease id, slots, longest line (-1: unbounded), lease ttl in ms.
///
/// Redis runs a script atomically (no other command runs between its commands), which is
/// what makes check-then-grant safe across replicas. Time comes from the server's `TIME`, so
/// every replica's leases expire by one clock.
pub const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holders, waiters, expiries, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, slots, longest, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
for _, w in ipairs(gone) do redis.call('ZREM', waiters, w) end
redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now)
local function keep()
  for _, k in ipairs({holders, waiters, expiries, counter}) do
    redis.call('PEXPIRE', k, ttl * 3)
  end
end
local function grant()
  redis.call('ZREM', waiters, id)
  redis.call('ZREM', expiries, id)
  redis.call('ZADD', holders, now + ttl, id)
  keep()
  return 1
end
if redis.call('ZSCORE', holders, id) then return grant() end
local free = slots - redis.call('ZCARD', holders)
local line = redis.call('ZCARD', waiters)
if not redis.call('ZSCORE', waiters, id) then
  if free > 0 and line == 0 then return grant() end
  if longest >= 0 and line >= longest then return -1 end
  redis.call('ZADD', waiters, redis.call('INCR', counter), id)
  redis.call('ZADD', expiries, now + ttl, id)
  keep()
  return 0
end
redis.call('ZADD', expiries, now + ttl, id)
if free > 0 and redis.call('ZRANK', waiters, id) < free then return grant() end
keep()
return 0
"#;

/// The common case in one round trip: a slot of every semaphore named (the conversation's,
/// the route cap's, the global cap's) when each has one free and nobody in line; otherwise
/// nothing changes (but expired entries go) and the caller takes them one by one with
/// [`ACQUIRE`]. Returns 1 (all granted) or 0.
///
/// KEYS: holders, waiters, waiter expiries of each semaphore. ARGV: lease id, lease ttl in
/// ms, then the slots of each semaphore.
pub const ACQUIRE_ALL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, ttl = ARGV[1], tonumber(ARGV[2])
local n = #KEYS / 3
for i = 0, n - 1 do
  local holders, waiters, expiries = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
  for _, w in ipairs(gone) do redis.call('ZREM', waiters, w) end
  redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now)
  local free = tonumber(ARGV[3 + i]) - redis.call('ZCARD', holders)
  if free <= 0 or redis.call('ZCARD', waiters) > 0 then return 0 end
end
for i = 0, n - 1 do
  redis.call('ZADD', KEYS[3 * i + 1], now + ttl, id)
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[3 * i + k], ttl * 3) end
end
return 1
"#;

/// Gives slots back, or places in line. KEYS: holders, waiters, waiter expiries of each
/// semaphore. ARGV: the lease id. Returns how many entries it removed.
pub const RELEASE: &str = r#"
local n = 0
for _, k in ipairs(KEYS) do n = n + redis.call('ZREM', k, ARGV[1]) end
return n
"#;

/// Extends held slots by the ttl from now. KEYS: the holders of each semaphore. ARGV: lease
/// id, ttl in ms. Returns how many slots were still held (fewer: one expired and was taken).
pub const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local held = 0
for _, k in ipairs(KEYS) do
  if redis.call('ZSCORE', k, ARGV[1]) then
    redis.call('ZADD', k, now + ttl, ARGV[1])
    redis.call('PEXPIRE', k, ttl * 3)
    held = held + 1
  end
end
return held
"#;

/// How often a replica that fell back pings Redis.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A waiter's first and longest pause between polls.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(25);

/// The operations, as the `op` label.
pub const OPS: [&str; 8] = [
    "acquire",
    "release",
    "renew",
    "view_get",
    "view_put",
    "summary_get",
    "summary_put",
    "ping",
];

/// The backend's metric families.
#[derive(Clone)]
pub struct StateMetrics {
    /// `ctxgate_state_redis_seconds{op}`.
    pub seconds: HistogramVec,
    /// `ctxgate_state_errors_total{op}`.
    pub errors: IntCounterVec,
    /// `ctxgate_state_fallbacks_total`.
    pub fallbacks: IntCounter,
    /// `ctxgate_state_recoveries_total`.
    pub recoveries: IntCounter,
    /// `ctxgate_state_local`.
    pub local: IntGauge,
    /// `ctxgate_state_leases`.
    pub leases: IntGauge,
}

impl StateMetrics {
    /// Registers the families, every op at 0.
    pub fn register(m: &Metrics) -> StateMetrics {
        let s = StateMetrics {
            seconds: m.histogram_vec(
                "ctxgate_state_redis_seconds",
                "Round trips to the shared-state Redis, by op (acquire, release, renew, view_get, view_put, summary_get, summary_put, ping).",
                &["op"],
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ],
            ),
            errors: m.counter_vec(
                "ctxgate_state_errors_total",
                "Shared-state round trips that failed or took longer than state.timeout, by op.",
                &["op"],
            ),
            fallbacks: m.counter(
                "ctxgate_state_fallbacks_total",
                "Times this replica turned to its local gates and view because Redis failed.",
            ),
            recoveries: m.counter(
                "ctxgate_state_recoveries_total",
                "Times this replica went back to the shared state after Redis answered again.",
            ),
            local: m.gauge(
                "ctxgate_state_local",
                "1 while this replica uses its local gates and view because Redis failed.",
            ),
            leases: m.gauge(
                "ctxgate_state_leases",
                "Gate leases (conversation, route and global slots) this replica holds in Redis.",
            ),
        };
        for op in OPS {
            s.errors.with_label_values(&[op]);
            s.seconds.with_label_values(&[op]);
        }
        s
    }
}

/// Why a shared acquisition did not give a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The line was full.
    Full,
    /// The deadline passed while waiting.
    Timeout,
    /// Redis failed (the replica has turned to its fallback).
    Unavailable,
}

/// The shared state of one replica: its Redis connection, its mode and its metrics.
pub struct State {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    on_error: OnStateError,
    /// This replica's id, the prefix of its lease ids and the writer of its view entries.
    replica: String,
    writer: u64,
    leases: AtomicU64,
    /// True while Redis is considered down (the fallback is in force).
    down: AtomicBool,
    probing: Mutex<bool>,
    acquire: Script,
    acquire_all: Script,
    release: Script,
    renew: Script,
    view_put: Script,
    metrics: StateMetrics,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("prefix", &self.prefix)
            .field("replica", &self.replica)
            .field("down", &self.down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why the shared state could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("state.redis_url: {0}")]
pub struct StartError(String);

impl State {
    /// The shared state `settings` asks for: `None` for the memory backend. Connects lazily:
    /// a Redis that is down at start only means the replica starts on its fallback.
    pub fn start(
        settings: &StateSettings,
        metrics: &Metrics,
    ) -> Result<Option<Arc<State>>, StartError> {
        if settings.backend == StateBackend::Memory {
            return Ok(None);
        }
        let Some(url) = &settings.redis_url else {
            return Err(StartError("missing".into()));
        };
        let client = redis::Client::open(url.expose())
            .map_err(|e| StartError(format!("{e} ({})", crate::config::mask_url(url.expose()))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StartError(e.to_string()))?;
        let writer = rand_u64();
        let state = Arc::new(State {
            conn,
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            lease_ttl: settings.lease_ttl,
            on_error: settings.on_error,
            replica: format!("{:016x}", writer),
            writer,
            leases: AtomicU64::new(0),
            down: AtomicBool::new(false),
            probing: Mutex::new(false),
            acquire: Script::new(ACQUIRE),
            acquire_all: Script::new(ACQUIRE_ALL),
            view_put: Script::new(shared::VIEW_PUT),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
            metrics: StateMetrics::register(metrics),
        });
        Ok(Some(state))
    }

    /// Checks Redis once at start (a ping within `timeout`); on failure the replica starts on
    /// its fallback, probing.
    pub async fn check(self: &Arc<Self>) {
        if self.ping().await.is_err() {
            self.failed("ping", "no answer at start");
            self.probe();
        } else {
            tracing::info!(prefix = %self.prefix, "shared state: Redis answers");
        }
    }

    /// Whether calls should use Redis now (false while the fallback is in force).
    pub fn up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// What to do while it is not.
    pub fn on_error(&self) -> OnStateError {
        self.on_error
    }

    /// The id this replica writes view entries under.
    pub fn writer(&self) -> u64 {
        self.writer
    }

    /// A key under the prefix, with `name` as its hash tag.
    fn key(&self, name: &str, part: &str) -> String {
        format!("{}{{{}}}:{}", self.prefix, name, part)
    }

    /// One round trip, timed, bounded by `timeout`; a failure turns the replica to its
    /// fallback.
    async fn trip<T, F>(&self, op: &'static str, f: F) -> Result<T, ()>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let start = Instant::now();
        let r = tokio::time::timeout(self.timeout, f).await;
        self.metrics
            .seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed(op, &e.to_string());
                Err(())
            }
            Err(_) => {
                self.failed(op, "timed out");
                Err(())
            }
        }
    }

    /// Runs a prepared script invocation as one timed, bounded round trip (see [`State::trip`]).
    async fn eval(&self, op: &'static str, inv: redis::ScriptInvocation<'_>) -> Result<i64, ()> {
        let mut c = self.conn.clone();
        self.trip(op, async move { inv.invoke_async::<i64>(&mut c).await })
            .await
    }

    /// The lease ttl in milliseconds, as the scripts take it.
    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a failed round trip; the first failure while up turns the fallback on (logged
    /// once) and starts the probe.
    fn failed(&self, op: &'static str, why: &str) {
        self.metrics.errors.with_label_values(&[op]).inc();
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.metrics.fallbacks.inc();
        self.metrics.local.set(1);
        match self.on_error {
            OnStateError::Local => tracing::warn!(op, error = why,
                "shared state: Redis failed; using this replica's local gates and view until it answers"),
            OnStateError::Reject => tracing::warn!(op, error = why,
                "shared state: Redis failed; refusing calls (state.on_error = \"reject\") until it answers"),
        }
    }

    async fn ping(&self) -> Result<(), ()> {
        let mut c = self.conn.clone();
        self.trip("ping", async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(|_| ())
    }

    /// The probe's test: a write that expires at once and a script call (the operations
    /// calls need), both within `timeout`.
    async fn healthy(&self) -> bool {
        let key = self.key("probe", "p");
        let mut c = self.conn.clone();
        // The script on a key that holds nothing (ZREM on a string would be a type error).
        let none = self.key("probe", "z");
        let mut inv = self.release.prepare_invoke();
        inv.key(&none).arg(&self.replica);
        let both = async {
            redis::cmd("SET")
                .arg(&key)
                .arg(&self.replica)
                .arg("PX")
                .arg(1000)
                .query_async::<()>(&mut c)
                .await?;
            inv.invoke_async::<i64>(&mut c).await
        };
        tokio::time::timeout(self.timeout, both)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Starts the probe if the fallback is on and no probe runs: it pings every 500 ms and
    /// turns the fallback off at the first answer. Called by the request path (cheap when
    /// up).
    pub fn probe(self: &Arc<Self>) {
        if self.up() {
            return;
        }
        {
            let mut p = self.probing.lock().unwrap_or_else(PoisonError::into_inner);
            if *p {
                return;
            }
            *p = true;
        }
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(s) = state.upgrade() else { return };
                if s.healthy().await {
                    *s.probing.lock().unwrap_or_else(PoisonError::into_inner) = false;
                    s.down.store(false, Ordering::Release);
                    s.metrics.recoveries.inc();
                    s.metrics.local.set(0);
                    tracing::info!(
                        "shared state: Redis answers again; back to the shared gates and view"
                    );
                    return;
                }
            }
        });
    }

    /// Waits for a slot of the semaphore `name` (`slots` of them; at most `longest` waiting,
    /// -1: no bound) until `deadline`. The lease is renewed while it is held and released
    /// when dropped; a waiter dropped while in line gives its place back.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        slots: usize,
        longest: i64,
        deadline: Option<Instant>,
    ) -> Result<Lease, Denied> {
        let mut lease = self.lease(&[name]);
        let counter = self.key(name, "n");
        let ttl_ms = self.ttl_ms();
        let mut pause = POLL_FIRST;
        loop {
            let mut inv = self.acquire.prepare_invoke();
            let [h, w, x] = &lease.keys[0];
            inv.key(h)
                .key(w)
                .key(x)
                .key(&counter)
                .arg(&lease.id)
                .arg(slots)
                .arg(longest)
                .arg(ttl_ms);
            let r = self.eval("acquire", inv).await;
            match r {
                Ok(1) => {
                    lease.arm();
                    return Ok(lease);
                }
                Ok(-1) => {
                    lease.renewer = Some(None);
                    return Err(Denied::Full);
                }
                Ok(_) => {}
                Err(()) => return Err(Denied::Unavailable),
            }
            // Still in line: poll again after the pause, and once more at the deadline.
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Denied::Timeout);
            }
            let wake = deadline.map_or(now + pause, |d| (now + pause).min(d));
            tokio::time::sleep_until(wake).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }
}

impl State {
    /// A lease (not yet granted) on the semaphores `names`.
    fn lease(self: &Arc<Self>, names: &[&str]) -> Lease {
        let seq = LEASES.fetch_add(1, Ordering::Relaxed);
        Lease {
            state: Arc::clone(self),
            keys: names
                .iter()
                .map(|n| [self.key(n, "h"), self.key(n, "w"), self.key(n, "x")])
                .collect(),
            id: format!("{}-{seq}", self.replica),
            renewer: None,
        }
    }

    /// A slot of every semaphore in `sems` (name, slots) in one round trip, when each has one
    /// free and nobody waiting (`Ok(None)` otherwise: take them one by one with
    /// [`State::acquire`]).
    pub async fn acquire_all(
        self: &Arc<Self>,
        sems: &[(&str, usize)],
    ) -> Result<Option<Lease>, Denied> {
        let names: Vec<&str> = sems.iter().map(|(n, _)| *n).collect();
        let mut lease = self.lease(&names);
        let ttl_ms = self.ttl_ms();
        let mut inv = self.acquire_all.prepare_invoke();
        for [h, w, x] in &lease.keys {
            inv.key(h).key(w).key(x);
        }
        inv.arg(&lease.id).arg(ttl_ms);
        for (_, slots) in sems {
            inv.arg(*slots);
        }
        let r = self.eval("acquire", inv).await;
        match r {
            Ok(1) => {
                lease.arm();
                Ok(Some(lease))
            }
            Ok(_) => {
                lease.renewer = Some(None);
                Ok(None)
            }
            // The script may have run before the reply was lost: the Drop gives back
            // whatever it may hold (best effort; else the slots expire after the ttl).
            Err(()) => Err(Denied::Unavailable),
        }
    }
}

static LEASES: AtomicU64 = AtomicU64::new(0);

/// A random 64-bit id (the replica's), from the std hasher's per-process random keys, the
/// clock and the pid.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A place in shared semaphores: held slots (renewed while held) or a place in a line.
/// Dropping it gives them back (one `RELEASE` round trip, off the request path).
pub struct Lease {
    state: Arc<State>,
    /// Holders, waiters and waiter expiries of each semaphore.
    keys: Vec<[String; 3]>,
    id: String,
    /// `None`: waiting. `Some(Some(task))`: held, renewed by the task. `Some(None)`: nothing
    /// to give back (refused).
    renewer: Option<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Lease {
    /// Granted: counts the lease and starts renewing it every third of the ttl.
    fn arm(&mut self) {
        self.state.leases.fetch_add(1, Ordering::Relaxed);
        self.state.metrics.leases.inc();
        let state = Arc::downgrade(&self.state);
        let holders: Vec<String> = self.keys.iter().map(|k| k[0].clone()).collect();
        let id = self.id.clone();
        let slots = holders.len() as i64;
        let every = self.state.lease_ttl / 3;
        let ttl_ms = self.state.ttl_ms();
        self.renewer = Some(Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = state.upgrade() else { return };
                let mut inv = s.renew.prepare_invoke();
                for h in &holders {
                    inv.key(h);
                }
                inv.arg(&id).arg(ttl_ms);
                match s.eval("renew", inv).await {
                    Ok(n) if n < slots => {
                        tracing::warn!(lease = %id, "shared state: a held lease expired before its renewal (Redis was unreachable longer than state.lease_ttl?)");
                        return;
                    }
                    Ok(_) => {}
                    Err(()) => {}
                }
            }
        })));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Held (renewed), or in line / granted unbeknown to us (a lost reply): either way
        // there may be something to give back. Refused: nothing.
        match self.renewer.take() {
            Some(None) => return,
            Some(Some(task)) => {
                task.abort();
                self.state.metrics.leases.dec();
                self.state.leases.fetch_sub(1, Ordering::Relaxed);
            }
            None => {}
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = Arc::clone(&self.state);
        let keys = std::mem::take(&mut self.keys);
        let id = std::mem::take(&mut self.id);
        rt.spawn(async move {
            let mut inv = state.release.prepare_invoke();
            for k in keys.iter().flatten() {
                inv.key(k);
            }
            inv.arg(&id);
            let _ = state.eval("release", inv).await;
        });
    }
}
