//! Gate: what phase 3 of the life of a request, admit (`proxy/admit.rs`), waits on; see
//! docs/ARCHITECTURE.md.
//!
//! Owns admission. A request enters only with a [`Permit`] that holds, in this order, a slot of
//! its conversation's semaphore, a slot of its route's cap (if the route has one) and a slot of
//! the global in-flight cap. Taking the conversation slot first means a request queued behind
//! its own conversation holds no global or route capacity, so different conversations never wait
//! on each other, only on the shared caps. All three waits share one `queue_timeout` deadline.
//!
//! Waiters are served in arrival order: each level is a tokio [`Semaphore`], which is FIFO-fair.
//! A conversation's queue is bounded; past the bound a request is rejected at once.
//!
//! A [`Permit`] is a drop guard: it gives everything back when dropped — end of stream, client
//! gone, timeout, panic in the task that owns it — so no path can leak a slot. A dropped
//! [`Gates::acquire`] future gives back what it had taken too.
//!
//! A conversation's gate is forgotten by [`Gates::sweep`] only once nobody holds or waits on it
//! and it has been idle for `idle_ttl`. The check and the removal happen under the same lock as
//! the registration in `acquire`, so a gate can never be forgotten while in use (which would let
//! a second call in through a fresh semaphore).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::OnStateError;
use crate::hash::Seeded;
use crate::state::{Denied, Lease, State};

/// The conversation map is split in this many independently locked shards, so that concurrent
/// requests of different conversations rarely contend and a sweep never stalls every request.
const SHARDS: usize = 16;

/// The sweeper never runs more often than this, whatever `idle_ttl` is.
const MIN_SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Admission limits, the `[gates]` table of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Requests of one conversation in flight at once (`max_concurrent_per_conversation`).
    /// 0 is treated as 1: a gate that never admits would only turn every call into a timeout.
    pub per_conversation: usize,
    /// Requests of one conversation that may wait for it; one more is rejected at once.
    pub max_queue_per_conversation: usize,
    /// Longest total wait for all slots (conversation, route, global) before rejection.
    pub queue_timeout: Duration,
    /// Requests in flight across all conversations. 0 is treated as 1.
    pub max_inflight: usize,
    /// How long an unused gate is kept before [`Gates::sweep`] forgets it.
    pub idle_ttl: Duration,
    /// Most gates kept at once (`max_conversations`): past it, a new conversation's gate
    /// replaces the longest-idle unused one, and when every gate is in use it is refused.
    pub max_conversations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_conversation: 1,
            max_queue_per_conversation: 8,
            queue_timeout: Duration::from_secs(60),
            max_inflight: 1024,
            idle_ttl: Duration::from_secs(300),
            max_conversations: 100_000,
        }
    }
}

/// Why a request was not admitted. The proxy answers both with 429 and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The conversation already had `limit` requests waiting.
    #[error(
        "conversation already has {limit} requests waiting (gates.max_queue_per_conversation)"
    )]
    QueueFull {
        /// The configured queue bound that was reached.
        limit: usize,
    },
    /// The gate table is full of conversations in use (`gates.max_conversations`).
    #[error("{limit} conversations are in flight already (gates.max_conversations)")]
    TableFull {
        /// The configured bound.
        limit: usize,
    },
    /// The shared state (Redis) cannot be reached and `state.on_error = "reject"`.
    #[error("the shared state (Redis) cannot be reached (state.on_error = \"reject\")")]
    StateUnavailable,
    /// No slot came free within the deadline.
    #[error("no gate slot came free within {timeout:?}, waited {waited:?} (gates.queue_timeout)")]
    QueueTimeout {
        /// How long the request waited before giving up.
        waited: Duration,
        /// The configured `queue_timeout`.
        timeout: Duration,
    },
}

impl Rejected {
    /// Short label for the rejection metric's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::QueueFull { .. } => "queue_full",
            Rejected::TableFull { .. } => "too_many_conversations",
            Rejected::QueueTimeout { .. } => "queue_timeout",
            Rejected::StateUnavailable => "state_unavailable",
        }
    }

    /// A hint for the `Retry-After` header, in whole seconds and at least 1 s.
    pub fn retry_after(&self) -> Duration {
        match self {
            // Rejecting a full queue costs nothing and a slot frees as soon as one call of the
            // conversation ends, so the client may come back soon.
            Rejected::QueueFull { .. }
            | Rejected::TableFull { .. }
            | Rejected::StateUnavailable => Duration::from_secs(1),
            // The gate stayed busy for the whole timeout: back off for a fraction of it, rounded
            // up to whole seconds (the header's unit) and capped so clients do not give up.
            Rejected::QueueTimeout { timeout, .. } => {
                let tenth = timeout.as_secs().div_ceil(10);
                Duration::from_secs(tenth.clamp(1, 30))
            }
        }
    }
}

/// The gates of all conversations plus the route and global caps; shared via `Arc`.
pub struct Gates {
    limits: Limits,
    global: Arc<Semaphore>,
    routes: HashMap<String, Arc<Semaphore>, Seeded>,
    table: Arc<Table>,
    /// Requests inside `acquire` that could not be admitted at once, at any level.
    waiters: AtomicUsize,
    /// With `[state] backend = "redis"`: the shared semaphores, used while Redis answers.
    shared: Option<Arc<State>>,
    /// The route caps' sizes (for the shared semaphores).
    route_caps: HashMap<String, usize, Seeded>,
}

/// The conversation map. Shared with every [`Permit`], which must update it when dropped even
/// after [`Gates`] itself is gone.
struct Table {
    shards: [Mutex<Shard>; SHARDS],
    hasher: Seeded,
    /// Conversations with at least one granted permit.
    active: AtomicUsize,
}

/// One shard of the table: the gates, and the idle ones in the order they went idle, so that a
/// full table finds its longest-idle gate without scanning.
#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Entry, Seeded>,
    /// `(key, idle_gen)` as each gate went idle, oldest first. An item is stale once its gate
    /// was used again (its `idle_gen` moved on) or forgotten; stale items are skipped when met
    /// and dropped whenever they outnumber the gates.
    idle: VecDeque<(Arc<str>, u64)>,
}

impl std::ops::Deref for Shard {
    type Target = HashMap<Arc<str>, Entry, Seeded>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Shard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Shard {
    /// Records that `key`'s gate just went idle.
    fn went_idle(&mut self, key: &Arc<str>, generation: u64) {
        self.idle.push_back((Arc::clone(key), generation));
        if self.idle.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.idle.retain(|(k, g)| is_idle(map, k, *g));
        }
    }

    /// Forgets the longest-idle gate nobody uses; false when every gate is in use.
    fn evict_longest_idle(&mut self) -> bool {
        while let Some((k, g)) = self.idle.pop_front() {
            if is_idle(&self.map, &k, g) {
                self.map.remove(&k);
                return true;
            }
        }
        false
    }
}

/// Whether `(key, generation)` still names an idle gate.
fn is_idle(map: &HashMap<Arc<str>, Entry, Seeded>, key: &str, generation: u64) -> bool {
    map.get(key)
        .is_some_and(|e| e.users == 0 && e.idle_gen == generation)
}

/// One conversation's gate. All counts change only under its shard's lock.
struct Entry {
    key: Arc<str>,
    slots: Arc<Semaphore>,
    /// Registrations alive: permits held plus requests inside `acquire`. Eviction needs 0.
    users: usize,
    /// Requests waiting for a conversation slot; bounded by `max_queue_per_conversation`.
    queued: usize,
    /// Permits granted and not yet dropped.
    held: usize,
    /// When `users` last dropped to 0 (or the gate was created).
    idle_since: Instant,
    /// How many times `users` dropped to 0 (names this idle spell in [`Shard::idle`]).
    idle_gen: u64,
}

impl Table {
    fn shard(&self, conversation: &str) -> MutexGuard<'_, Shard> {
        // The hash is reduced modulo SHARDS, so the index is always in range.
        let index = (self.hasher.hash_one(conversation) % SHARDS as u64) as usize;
        lock(&self.shards[index])
    }
}

/// Locks a shard. Poisoning is ignored because no critical section leaves an entry half updated
/// (each is a few integer updates), so the data is sound even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gates {
    /// Builds the gates. `route_caps` gives `(route name, max in flight)` for the routes that
    /// have their own cap; other routes are bounded only by the global cap. A cap of 0 is
    /// treated as 1 (config validation should reject it before it gets here).
    pub fn new(
        limits: Limits,
        route_caps: impl IntoIterator<Item = (String, usize)>,
    ) -> Arc<Gates> {
        Gates::new_shared(limits, route_caps, None)
    }

    /// [`Gates::new`], with the shared state: while it answers, every slot is a lease of a
    /// semaphore in Redis (the conversation's, the route cap's, the global cap's), the same
    /// on every replica; while it does not, the local gates admit (`on_error = "local"`) or
    /// nothing does (`"reject"`).
    pub fn new_shared(
        limits: Limits,
        route_caps: impl IntoIterator<Item = (String, usize)>,
        shared: Option<Arc<State>>,
    ) -> Arc<Gates> {
        let limits = Limits {
            per_conversation: permits(limits.per_conversation),
            max_inflight: permits(limits.max_inflight),
            ..limits
        };
        let route_caps: HashMap<String, usize, Seeded> = route_caps
            .into_iter()
            .map(|(route, cap)| (route, permits(cap)))
            .collect();
        let routes = route_caps
            .iter()
            .map(|(route, &cap)| (route.clone(), Arc::new(Semaphore::new(cap))))
            .collect();
        Arc::new(Gates {
            global: Arc::new(Semaphore::new(limits.max_inflight)),
            routes,
            table: Arc::new(Table {
                shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
                hasher: Seeded::default(),
                active: AtomicUsize::new(0),
            }),
            waiters: AtomicUsize::new(0),
            shared,
            route_caps,
            limits,
        })
    }

    /// With shared state: the permit from Redis while it answers (`Ok(Some)`), a refusal,
    /// or `Ok(None)` when the local gates must admit instead (Redis failed, `on_error =
    /// "local"`). Without shared state: `Ok(None)`.
    async fn acquire_shared_state(
        &self,
        conversation: Option<&str>,
        route: &str,
    ) -> Result<Option<Permit>, Rejected> {
        let Some(s) = &self.shared else {
            return Ok(None);
        };
        if s.up() {
            let start = Instant::now();
            let deadline = start.checked_add(self.limits.queue_timeout);
            let mut _waiting = None;
            let denied = |d: Denied| match d {
                Denied::Full => Some(Rejected::QueueFull {
                    limit: self.limits.max_queue_per_conversation,
                }),
                Denied::Timeout => Some(Rejected::QueueTimeout {
                    waited: start.elapsed(),
                    timeout: self.limits.queue_timeout,
                }),
                Denied::Unavailable => None,
            };
            // The semaphores, in the order the local gates take them: the conversation's, the
            // route cap's, the global one; all in one round trip when each has a free slot and
            // nobody waiting, else one by one, waiting in line.
            let mut sems: Vec<(String, usize, i64)> = Vec::with_capacity(3);
            if let Some(c) = conversation {
                let longest =
                    i64::try_from(self.limits.max_queue_per_conversation).unwrap_or(i64::MAX);
                sems.push((format!("c:{c}"), self.limits.per_conversation, longest));
            }
            if let Some(&cap) = self.route_caps.get(route) {
                sems.push((format!("r:{route}"), cap, -1));
            }
            sems.push(("g".to_string(), self.limits.max_inflight, -1));
            let mut leases = Vec::with_capacity(3);
            let all: Vec<(&str, usize)> = sems.iter().map(|(n, k, _)| (n.as_str(), *k)).collect();
            let mut failed = match s.acquire_all(&all).await {
                Ok(Some(l)) => {
                    leases.push(l);
                    None
                }
                Ok(None) => None,
                Err(d) => Some(d),
            };
            if leases.is_empty() && failed.is_none() {
                // Not admitted at once: counted as waiting until it is (or gives up).
                _waiting = Some(Waiting::start(&self.waiters));
                for (name, slots, longest) in &sems {
                    match s.acquire(name, *slots, *longest, deadline).await {
                        Ok(l) => leases.push(l),
                        Err(d) => {
                            failed = Some(d);
                            break;
                        }
                    }
                }
            }
            match failed.map(denied) {
                None => {
                    let active = conversation.map(|_| Active::start(&self.table));
                    return Ok(Some(Permit {
                        _global: None,
                        _route: None,
                        _conversation: None,
                        _registration: None,
                        _shared: leases,
                        _active: active,
                        waited: start.elapsed(),
                    }));
                }
                Some(Some(r)) => return Err(r),
                // Redis failed: what was taken goes back (or expires), and the local gates
                // admit.
                Some(None) => drop(leases),
            }
        }
        s.probe();
        match s.on_error() {
            OnStateError::Local => Ok(None),
            OnStateError::Reject => Err(Rejected::StateUnavailable),
        }
    }

    /// The limits in force (after 0 caps were raised to 1).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Waits for a slot of `conversation`, then of `route`'s cap, then of the global cap, all
    /// within one `queue_timeout`. Dropping the returned future gives back whatever it held.
    pub async fn acquire(&self, conversation: &str, route: &str) -> Result<Permit, Rejected> {
        if let Some(p) = self.acquire_shared_state(Some(conversation), route).await? {
            return Ok(p);
        }
        let start = Instant::now();
        // A timeout too large to add to the clock is as good as none.
        let deadline = start.checked_add(self.limits.queue_timeout);
        let timed_out = || {
            let waited = start.elapsed();
            tracing::debug!(route, ?waited, "gate wait timed out");
            Rejected::QueueTimeout {
                waited,
                timeout: self.limits.queue_timeout,
            }
        };
        // Declared before the slots so that, on every early return, the slots are dropped
        // first (locals drop in reverse order) and the registration ends last; see `Permit`.
        let (mut registration, slots, conversation_slot) = self.register(conversation, route)?;
        let mut waiting: Option<Waiting<'_>> = None;

        let conversation_slot = match conversation_slot {
            Some(slot) => slot,
            None => {
                waiting.get_or_insert_with(|| Waiting::start(&self.waiters));
                tracing::debug!(route, "request queued behind its conversation");
                let slot = wait_for(slots, deadline).await;
                registration.leave_queue();
                slot.ok_or_else(timed_out)?
            }
        };
        let (route_slot, global_slot) = self
            .take_caps(route, deadline, &mut waiting)
            .await
            .ok_or_else(timed_out)?;

        registration.grant();
        Ok(Permit {
            _global: Some(global_slot),
            _route: route_slot,
            _conversation: Some(conversation_slot),
            _registration: Some(registration),
            _shared: Vec::new(),
            _active: None,
            waited: start.elapsed(),
        })
    }

    /// Admits a request that belongs to no conversation (model lists, embeddings, files):
    /// only the route cap and the global cap apply, under the same `queue_timeout`.
    pub async fn acquire_shared(&self, route: &str) -> Result<Permit, Rejected> {
        if let Some(p) = self.acquire_shared_state(None, route).await? {
            return Ok(p);
        }
        let start = Instant::now();
        let deadline = start.checked_add(self.limits.queue_timeout);
        let mut waiting: Option<Waiting<'_>> = None;
        let (route_slot, global_slot) = self
            .take_caps(route, deadline, &mut waiting)
            .await
            .ok_or_else(|| Rejected::QueueTimeout {
                waited: start.elapsed(),
                timeout: self.limits.queue_timeout,
            })?;
        Ok(Permit {
            _global: Some(global_slot),
            _route: route_slot,
            _conversation: None,
            _registration: None,
            _shared: Vec::new(),
            _active: None,
            waited: start.elapsed(),
        })
    }

    /// Takes a slot of the route's cap (if it has one), then of the global cap, before the
    /// deadline; `None` when the deadline passed (whatever was taken is given back on drop).
    async fn take_caps<'a>(
        &'a self,
        route: &str,
        deadline: Option<Instant>,
        waiting: &mut Option<Waiting<'a>>,
    ) -> Option<(Option<OwnedSemaphorePermit>, OwnedSemaphorePermit)> {
        let route_slot = match self.routes.get(route) {
            Some(cap) => Some(take(cap, deadline, waiting, &self.waiters, route, "route").await?),
            None => None,
        };
        let global_slot = take(
            &self.global,
            deadline,
            waiting,
            &self.waiters,
            route,
            "global",
        )
        .await?;
        Some((route_slot, global_slot))
    }

    /// Under the shard lock: finds or creates the conversation's gate, counts the request as a
    /// user (so the gate cannot be evicted from here on), and either takes a free slot or joins
    /// the queue if it is not full.
    fn register(&self, conversation: &str, route: &str) -> Result<Registered, Rejected> {
        let mut shard = self.table.shard(conversation);
        if !shard.contains_key(conversation) && shard.len() >= self.shard_bound() {
            // Full: the longest-idle gate nobody uses makes room (forgetting it early is safe:
            // nobody holds or waits on it, so a fresh one admits exactly as it would). Taken
            // from the shard's idle list: no scan of the table.
            if !shard.evict_longest_idle() {
                let limit = self.limits.max_conversations;
                tracing::debug!(route, limit, "gate table full of conversations in use");
                return Err(Rejected::TableFull { limit });
            }
        }
        let entry = match shard.get_mut(conversation) {
            Some(entry) => entry,
            None => {
                // Allocate the key only for a conversation not seen before.
                let key: Arc<str> = Arc::from(conversation);
                shard.entry(Arc::clone(&key)).or_insert_with(|| Entry {
                    key,
                    slots: Arc::new(Semaphore::new(self.limits.per_conversation)),
                    users: 0,
                    queued: 0,
                    held: 0,
                    idle_since: Instant::now(),
                    idle_gen: 0,
                })
            }
        };
        // The semaphore hands released slots to waiters before anyone else, so a free slot here
        // means nobody is queued: taking it does not jump the queue.
        let slot = Arc::clone(&entry.slots).try_acquire_owned().ok();
        if slot.is_none() {
            let limit = self.limits.max_queue_per_conversation;
            if entry.queued >= limit {
                tracing::debug!(route, limit, "conversation queue full");
                return Err(Rejected::QueueFull { limit });
            }
            entry.queued += 1;
        }
        entry.users += 1;
        let registration = Registration {
            table: Arc::clone(&self.table),
            key: Arc::clone(&entry.key),
            queued: slot.is_none(),
            held: false,
        };
        Ok((registration, Arc::clone(&entry.slots), slot))
    }

    /// Gates one shard may keep: `max_conversations` spread over the shards.
    fn shard_bound(&self) -> usize {
        self.limits.max_conversations.div_ceil(SHARDS).max(1)
    }

    /// Conversations currently holding at least one permit (the "active gates" gauge).
    pub fn active_gates(&self) -> usize {
        self.table.active.load(Ordering::Relaxed)
    }

    /// Requests currently waiting for a slot at any level (the "waiters" gauge).
    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    /// Gates in the map: held, awaited, or idle and not yet swept.
    pub fn known_gates(&self) -> usize {
        self.table
            .shards
            .iter()
            .map(|shard| lock(shard).len())
            .sum()
    }

    /// Forgets every gate that nobody holds or waits on and that has been idle for at least
    /// `idle_ttl`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.limits.idle_ttl;
        for shard in &self.table.shards {
            // `users` is checked under the same lock that `register` increments it under, so a
            // gate in use can never be removed.
            let mut shard = lock(shard);
            shard.retain(|_, entry| {
                entry.users > 0 || now.saturating_duration_since(entry.idle_since) < ttl
            });
            let Shard { map, idle } = &mut *shard;
            idle.retain(|(k, g)| is_idle(map, k, *g));
        }
    }

    /// Spawns a task that sweeps every `idle_ttl / 2` (at least every second), so a gate is
    /// forgotten at most 1.5 × `idle_ttl` after its last use. The task holds only a weak
    /// reference and ends once the `Gates` is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> JoinHandle<()> {
        let gates = Arc::downgrade(self);
        let period = (self.limits.idle_ttl / 2).max(MIN_SWEEP_PERIOD);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
            // After a stall, one sweep catches up on everything; a burst would be wasted work.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(gates) = gates.upgrade() else {
                    break;
                };
                gates.sweep();
            }
        })
    }
}

impl fmt::Debug for Gates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gates")
            .field("limits", &self.limits)
            .field("routes", &self.routes.keys().collect::<Vec<_>>())
            .field("known_gates", &self.known_gates())
            .field("active_gates", &self.active_gates())
            .field("waiters", &self.waiters())
            .finish()
    }
}

/// What `register` hands back: the request's registration, its conversation's semaphore, and
/// the conversation slot if one was free (else the request is queued for it).
type Registered = (Registration, Arc<Semaphore>, Option<OwnedSemaphorePermit>);

/// Semaphore sizes: at least 1 (see [`Limits`]) and at most what tokio accepts (it panics above).
fn permits(n: usize) -> usize {
    n.clamp(1, Semaphore::MAX_PERMITS)
}

/// Takes a slot of a shared cap, at once if one is free, else by waiting in line until the
/// deadline. `None` means the deadline passed.
async fn take<'a>(
    cap: &Arc<Semaphore>,
    deadline: Option<Instant>,
    waiting: &mut Option<Waiting<'a>>,
    waiters: &'a AtomicUsize,
    route: &str,
    level: &'static str,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = Arc::clone(cap).try_acquire_owned() {
        return Some(slot);
    }
    waiting.get_or_insert_with(|| Waiting::start(waiters));
    tracing::debug!(route, level, "request waits for an in-flight cap");
    wait_for(Arc::clone(cap), deadline).await
}

/// Waits in line for one slot until the deadline (`None`: no deadline).
async fn wait_for(
    semaphore: Arc<Semaphore>,
    deadline: Option<Instant>,
) -> Option<OwnedSemaphorePermit> {
    let acquire = async move {
        match semaphore.acquire_owned().await {
            Ok(slot) => slot,
            // Only a closed semaphore fails, and none here is ever closed. Were one closed it
            // could never admit, so the request would wait out its deadline like any other.
            Err(_closed) => std::future::pending().await,
        }
    };
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, acquire).await.ok(),
        None => Some(acquire.await),
    }
}

/// Counts a request in the waiters gauge for as long as it lives; a guard rather than code
/// after `.await`, so a dropped `acquire` future is uncounted too.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn start(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request's claim on its conversation's gate, from registration in `acquire` until its
/// permit is dropped. While it lives the gate cannot be evicted. Its `Drop` undoes exactly what
/// was counted, whether `acquire` finished, failed or was cancelled.
struct Registration {
    table: Arc<Table>,
    key: Arc<str>,
    /// Counted in the entry's `queued`.
    queued: bool,
    /// Counted in the entry's `held`.
    held: bool,
}

impl Registration {
    /// The request has its conversation slot or gave up: it no longer occupies the queue.
    fn leave_queue(&mut self) {
        if !self.queued {
            return;
        }
        let mut shard = self.table.shard(&self.key);
        if let Some(entry) = shard.get_mut(&*self.key) {
            entry.queued = entry.queued.saturating_sub(1);
        }
        self.queued = false;
    }

    /// The request has all its slots: count it as held.
    fn grant(&mut self) {
        let mut shard = self.table.shard(&self.key);
        if let Some(entry) = shard.get_mut(&*self.key) {
            entry.held += 1;
            if entry.held == 1 {
                self.table.active.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.held = true;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.table.shard(&self.key);
        // The entry exists: `users` > 0 keeps it in the map. The counts cannot underflow either;
        // saturating keeps a bug from turning into a panic inside a drop.
        let Some(entry) = shard.get_mut(&*self.key) else {
            debug_assert!(false, "gate evicted while in use");
            return;
        };
        if self.queued {
            entry.queued = entry.queued.saturating_sub(1);
        }
        if self.held {
            entry.held = entry.held.saturating_sub(1);
            if entry.held == 0 {
                // Changes of `held` are serialised by the shard lock, so every 1 → 0 here
                // follows the 0 → 1 that incremented `active`: it never goes below 0.
                self.table.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
        entry.users = entry.users.saturating_sub(1);
        if entry.users == 0 {
            entry.idle_since = Instant::now();
            entry.idle_gen += 1;
            let generation = entry.idle_gen;
            shard.went_idle(&self.key, generation);
        }
    }
}

/// Admission to the upstream: slots of the conversation, the route cap (if any) and the global
/// cap. Dropping it gives them all back and updates the gauges; carry it in the response body so
/// that it lives exactly as long as the call.
pub struct Permit {
    // Fields drop in declaration order: the slots go back before the registration ends, so the
    // gate cannot be evicted — and re-created with a fresh semaphore that would admit a second
    // call — while one of its slots is still out.
    _global: Option<OwnedSemaphorePermit>,
    _route: Option<OwnedSemaphorePermit>,
    /// `None` for requests that belong to no conversation (see [`Gates::acquire_shared`]).
    _conversation: Option<OwnedSemaphorePermit>,
    _registration: Option<Registration>,
    /// The leases of the shared semaphores (conversation, route, global) when Redis admitted.
    _shared: Vec<Lease>,
    /// Counts a conversation admitted by Redis in the active-gates gauge.
    _active: Option<Active>,
    waited: Duration,
}

/// A conversation admitted through the shared state, counted as active while it lives.
struct Active(Arc<Table>);

impl Active {
    fn start(table: &Arc<Table>) -> Active {
        table.active.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(table))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Permit {
    /// How long `acquire` waited for this permit (for the gate wait-time histogram).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("waited", &self.waited)
            .field("route_capped", &self._route.is_some())
            .field("shared", &self._shared.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    const SEC: Duration = Duration::from_secs(1);

    fn gates(limits: Limits) -> Arc<Gates> {
        Gates::new(limits, [])
    }

    /// Lets spawned tasks run (without moving the paused clock) until `cond` holds.
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never held");
    }

    /// Spawns an acquire that reports its admission time (relative to `t0`) and then holds its
    /// permit for `hold`.
    fn spawn_acquire(
        gates: &Arc<Gates>,
        conversation: &'static str,
        route: &'static str,
        hold: Duration,
    ) -> JoinHandle<Result<Duration, Rejected>> {
        let gates = Arc::clone(gates);
        tokio::spawn(async move {
            let permit = gates.acquire(conversation, route).await?;
            let waited = permit.waited();
            tokio::time::sleep(hold).await;
            drop(permit);
            Ok(waited)
        })
    }

    fn assert_idle(gates: &Gates) {
        assert_eq!(gates.active_gates(), 0, "active gates");
        assert_eq!(gates.waiters(), 0, "waiters");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_admitted_in_arrival_order() {
        let gates = gates(Limits::default());
        let holder = gates.acquire("c", "r").await.unwrap();
        let t0 = Instant::now();
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let gates2 = Arc::clone(&gates);
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let permit = gates2.acquire("c", "r").await.unwrap();
                order.lock().unwrap().push((i, t0.elapsed()));
                tokio::time::sleep(SEC).await;
                drop(permit);
            }));
            until(|| gates.waiters() == i + 1).await;
        }
        assert_eq!(gates.active_gates(), 1);
        drop(holder);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let expected: Vec<_> = (0..5).map(|i| (i, SEC * i as u32)).collect();
        assert_eq!(order, expected);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_rejects_at_once() {
        let gates = gates(Limits {
            max_queue_per_conversation: 2,
            ..Limits::default()
        });
        let holder = gates.acquire("c", "r").await.unwrap();
        let first = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        let second = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 2).await;

        let t0 = Instant::now();
        let rejected = gates.acquire("c", "r").await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(rejected, Rejected::QueueFull { limit: 2 });
        assert_eq!(rejected.reason(), "queue_full");
        assert_eq!(rejected.retry_after(), SEC);
        assert_eq!(
            rejected.to_string(),
            "conversation already has 2 requests waiting (gates.max_queue_per_conversation)"
        );
        // Another conversation is not affected by this one's queue.
        drop(gates.acquire("other", "r").await.unwrap());

        drop(holder);
        assert_eq!(first.await.unwrap(), Ok(Duration::ZERO));
        assert_eq!(second.await.unwrap(), Ok(Duration::ZERO));
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_timeout_fires_exactly_at_the_limit() {
        let gates = gates(Limits::default());
        let _holder = gates.acquire("c", "r").await.unwrap();
        let t0 = Instant::now();
        let rejected = gates.acquire("c", "r").await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
        assert_eq!(
            rejected,
            Rejected::QueueTimeout {
                waited: Duration::from_secs(60),
                timeout: Duration::from_secs(60),
            }
        );
        assert_eq!(rejected.reason(), "queue_timeout");
        assert_eq!(rejected.retry_after(), Duration::from_secs(6));
        assert_eq!(gates.waiters(), 0);
        // The timed-out waiter left the queue: a full queue's worth can wait again.
        let gates = Gates::new(
            Limits {
                max_queue_per_conversation: 1,
                ..Limits::default()
            },
            [],
        );
        let _holder = gates.acquire("c", "r").await.unwrap();
        assert!(matches!(
            gates.acquire("c", "r").await,
            Err(Rejected::QueueTimeout { .. })
        ));
        assert!(matches!(
            gates.acquire("c", "r").await,
            Err(Rejected::QueueTimeout { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_timeout_spans_all_levels() {
        let gates = gates(Limits {
            max_inflight: 2,
            ..Limits::default()
        });
        let conversation_holder = gates.acquire("c", "r").await.unwrap();
        let _global_holder = gates.acquire("x", "r").await.unwrap();
        // "y" is first in line for the global cap.
        let y = spawn_acquire(&gates, "y", "r", Duration::from_secs(100));
        until(|| gates.waiters() == 1).await;
        let t0 = Instant::now();
        let waiter = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 2).await;
        // 40 s behind its conversation; then the freed global slot goes to "y", and the waiter
        // spends the remaining 20 s behind the global cap.
        tokio::time::sleep(Duration::from_secs(40)).await;
        drop(conversation_holder);
        let rejected = waiter.await.unwrap().unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
        assert_eq!(
            rejected,
            Rejected::QueueTimeout {
                waited: Duration::from_secs(60),
                timeout: Duration::from_secs(60),
            }
        );
        assert_eq!(gates.waiters(), 0);
        assert_eq!(y.await.unwrap(), Ok(Duration::from_secs(40)));
    }

    #[tokio::test(start_paused = true)]
    async fn different_conversations_do_not_wait_on_each_other() {
        let gates = gates(Limits::default());
        let a = gates.acquire("a", "r").await.unwrap();
        let queued_on_a = spawn_acquire(&gates, "a", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        let t0 = Instant::now();
        let b = gates.acquire("b", "r").await.unwrap();
        let c = gates.acquire("c", "other-route").await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(b.waited(), Duration::ZERO);
        assert_eq!(c.waited(), Duration::ZERO);
        assert_eq!(gates.active_gates(), 3);
        assert_eq!(gates.known_gates(), 3);
        drop((a, b, c));
        assert_eq!(queued_on_a.await.unwrap(), Ok(Duration::ZERO));
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn per_conversation_two_admits_two() {
        let gates = gates(Limits {
            per_conversation: 2,
            ..Limits::default()
        });
        let first = gates.acquire("c", "r").await.unwrap();
        let second = gates.acquire("c", "r").await.unwrap();
        assert_eq!(gates.active_gates(), 1);
        let third = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        tokio::time::sleep(SEC).await;
        assert!(!third.is_finished());
        drop(first);
        assert_eq!(third.await.unwrap(), Ok(SEC));
        drop(second);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn global_cap_blocks_across_conversations_and_releases() {
        let gates = gates(Limits {
            max_inflight: 2,
            ..Limits::default()
        });
        let a = gates.acquire("a", "r").await.unwrap();
        let b = gates.acquire("b", "r").await.unwrap();
        let c = spawn_acquire(&gates, "c", "r", SEC);
        until(|| gates.waiters() == 1).await;
        let d = spawn_acquire(&gates, "d", "r", Duration::ZERO);
        until(|| gates.waiters() == 2).await;
        assert_eq!(gates.active_gates(), 2);
        tokio::time::sleep(SEC * 3).await;
        drop(b);
        // "c" takes the freed slot for 1 s; "d" stays blocked until "c" gives it back.
        assert_eq!(c.await.unwrap(), Ok(SEC * 3));
        assert_eq!(d.await.unwrap(), Ok(SEC * 4));
        drop(a);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn shared_requests_take_only_the_caps() {
        let gates = Gates::new(
            Limits {
                max_inflight: 1,
                queue_timeout: SEC * 10,
                ..Limits::default()
            },
            [("capped".to_string(), 1)],
        );
        let a = gates.acquire_shared("r").await.unwrap();
        // No conversation gate is created for a shared request.
        assert_eq!(gates.known_gates(), 0);
        assert_eq!(gates.active_gates(), 0);
        let g2 = Arc::clone(&gates);
        let b = tokio::spawn(async move { g2.acquire_shared("r").await.map(|p| p.waited()) });
        until(|| gates.waiters() == 1).await;
        tokio::time::sleep(SEC * 2).await;
        drop(a);
        assert_eq!(b.await.unwrap(), Ok(SEC * 2));
        // The global cap still bounds it: a held shared permit makes the next one time out.
        let held = gates.acquire_shared("capped").await.unwrap();
        let start = Instant::now();
        let r = gates.acquire_shared("r").await.unwrap_err();
        assert_eq!(r.reason(), "queue_timeout");
        assert_eq!(start.elapsed(), SEC * 10);
        drop(held);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn conversation_waiters_hold_no_global_capacity() {
        let gates = gates(Limits {
            max_inflight: 2,
            ..Limits::default()
        });
        let a = gates.acquire("a", "r").await.unwrap();
        let queued = spawn_acquire(&gates, "a", "r", Duration::ZERO);
        let queued2 = spawn_acquire(&gates, "a", "r", Duration::ZERO);
        until(|| gates.waiters() == 2).await;
        // Two requests wait on "a", yet the second global slot is still free for "b".
        let b = gates.acquire("b", "r").await.unwrap();
        assert_eq!(b.waited(), Duration::ZERO);
        drop((a, b));
        assert_eq!(queued.await.unwrap(), Ok(Duration::ZERO));
        assert_eq!(queued2.await.unwrap(), Ok(Duration::ZERO));
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn route_cap_limits_only_its_route() {
        let gates = Gates::new(Limits::default(), [("capped".to_string(), 1)]);
        let a = gates.acquire("a", "capped").await.unwrap();
        let b = spawn_acquire(&gates, "b", "capped", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        // Another route is not capped by it.
        let c = gates.acquire("c", "free").await.unwrap();
        assert_eq!(c.waited(), Duration::ZERO);
        tokio::time::sleep(SEC * 2).await;
        assert!(!b.is_finished());
        drop(a);
        assert_eq!(b.await.unwrap(), Ok(SEC * 2));
        drop(c);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_permit_admits_the_next_waiter() {
        let gates = gates(Limits::default());
        let holder = gates.acquire("c", "r").await.unwrap();
        let next = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        tokio::time::sleep(SEC * 5).await;
        drop(holder);
        assert_eq!(next.await.unwrap(), Ok(SEC * 5));
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_waiting_acquire_leaks_nothing() {
        let gates = gates(Limits {
            max_queue_per_conversation: 1,
            ..Limits::default()
        });
        let holder = gates.acquire("c", "r").await.unwrap();
        let cancelled = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(gates.waiters(), 0);
        // Its queue place is free again, and the next waiter gets in when the holder leaves.
        let next = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        drop(holder);
        assert_eq!(next.await.unwrap(), Ok(Duration::ZERO));
        assert_idle(&gates);

        // Cancelled while holding the conversation slot and waiting on the global cap: the
        // conversation slot comes back too.
        let gates = Gates::new(
            Limits {
                max_inflight: 2,
                ..Limits::default()
            },
            [],
        );
        let _x = gates.acquire("x", "r").await.unwrap();
        let y = gates.acquire("y", "r").await.unwrap();
        let cancelled = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 1).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(gates.waiters(), 0);
        drop(y);
        let c = gates.acquire("c", "r").await.unwrap();
        assert_eq!(c.waited(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gate_is_forgotten_after_idle_ttl() {
        let gates = gates(Limits::default());
        drop(gates.acquire("c", "r").await.unwrap());
        assert_eq!(gates.known_gates(), 1);
        tokio::time::sleep(Duration::from_secs(300) - Duration::from_millis(1)).await;
        gates.sweep();
        assert_eq!(gates.known_gates(), 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        gates.sweep();
        assert_eq!(gates.known_gates(), 0);
        // Use restarts the idle clock.
        drop(gates.acquire("c", "r").await.unwrap());
        tokio::time::sleep(Duration::from_secs(200)).await;
        drop(gates.acquire("c", "r").await.unwrap());
        tokio::time::sleep(Duration::from_secs(200)).await;
        gates.sweep();
        assert_eq!(gates.known_gates(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn held_gate_is_never_forgotten() {
        let gates = gates(Limits::default());
        let holder = gates.acquire("c", "r").await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(300)).await;
            gates.sweep();
        }
        assert_eq!(gates.known_gates(), 1);
        // Still the same gate: a second call of the conversation is not let in.
        let t0 = Instant::now();
        assert!(matches!(
            gates.acquire("c", "r").await,
            Err(Rejected::QueueTimeout { .. })
        ));
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
        drop(holder);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn awaited_gate_is_never_forgotten() {
        let gates = gates(Limits {
            max_inflight: 1,
            queue_timeout: Duration::from_secs(10_000),
            ..Limits::default()
        });
        let other = gates.acquire("other", "r").await.unwrap();
        // "c" has no permit, only requests waiting for one: the first on the global cap, the
        // second behind the first on the conversation.
        let first = spawn_acquire(&gates, "c", "r", SEC);
        until(|| gates.waiters() == 1).await;
        let second = spawn_acquire(&gates, "c", "r", Duration::ZERO);
        until(|| gates.waiters() == 2).await;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(300)).await;
            gates.sweep();
        }
        assert_eq!(gates.known_gates(), 2);
        assert_eq!(gates.active_gates(), 1);
        drop(other);
        // Still one gate for "c": the second request waits for the first to finish.
        assert_eq!(first.await.unwrap(), Ok(Duration::from_secs(3000)));
        assert_eq!(second.await.unwrap(), Ok(Duration::from_secs(3001)));
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_forgets_idle_gates_and_stops_with_gates() {
        let gates = gates(Limits::default());
        let sweeper = gates.spawn_sweeper();
        drop(gates.acquire("c", "r").await.unwrap());
        let held = gates.acquire("h", "r").await.unwrap();
        tokio::time::sleep(Duration::from_secs(450)).await;
        assert_eq!(gates.known_gates(), 1);
        drop(held);
        drop(gates);
        // The next tick (one period later) finds the gates gone and ends the task.
        tokio::time::timeout(Duration::from_secs(150), sweeper)
            .await
            .expect("sweeper still running")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn permit_in_a_panicking_task_is_released() {
        let gates = gates(Limits::default());
        let permit = gates.acquire("c", "r").await.unwrap();
        let task = tokio::spawn(async move {
            let _permit = permit;
            panic!("handler bug");
        });
        assert!(task.await.unwrap_err().is_panic());
        let again = gates.acquire("c", "r").await.unwrap();
        assert_eq!(again.waited(), Duration::ZERO);
        drop(again);
        assert_idle(&gates);
    }

    #[tokio::test(start_paused = true)]
    async fn gauges_return_to_zero() {
        let gates = Gates::new(
            Limits {
                max_inflight: 3,
                ..Limits::default()
            },
            [("capped".to_string(), 2)],
        );
        let tasks: Vec<_> = ["a", "a", "b", "b", "c", "d", "e"]
            .into_iter()
            .enumerate()
            .map(|(i, conversation)| {
                let route = if i % 2 == 0 { "capped" } else { "free" };
                spawn_acquire(&gates, conversation, route, SEC)
            })
            .collect();
        until(|| gates.waiters() > 0).await;
        assert!(gates.active_gates() > 0);
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        assert_idle(&gates);
        assert_eq!(gates.known_gates(), 5);
        tokio::time::sleep(Duration::from_secs(300)).await;
        gates.sweep();
        assert_eq!(gates.known_gates(), 0);
    }

    /// The one test on real threads (no clock involved, nothing sleeps): requests race a sweep
    /// that runs constantly with `idle_ttl` 0, and a conversation must still never have two
    /// calls in flight — eviction of a gate in use would let a second one in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eviction_racing_acquire_never_admits_two() {
        let gates = gates(Limits {
            max_queue_per_conversation: 64,
            idle_ttl: Duration::ZERO,
            ..Limits::default()
        });
        let in_flight: Arc<[AtomicUsize; 4]> =
            Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (gates, stop) = (Arc::clone(&gates), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    gates.sweep();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut tasks = Vec::new();
        for task in 0..16 {
            let (gates, in_flight) = (Arc::clone(&gates), Arc::clone(&in_flight));
            tasks.push(tokio::spawn(async move {
                for round in 0..200 {
                    let conversation = (task + round) % 4;
                    let key = ["a", "b", "c", "d"][conversation];
                    let permit = gates.acquire(key, "r").await.unwrap();
                    let before = in_flight[conversation].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(before, 0, "two calls of {key} in flight");
                    tokio::task::yield_now().await;
                    in_flight[conversation].fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        sweeper.await.unwrap();
        assert_idle(&gates);
        gates.sweep();
        assert_eq!(gates.known_gates(), 0);
    }

    /// An id flood keeps the table at its bound: idle gates make room, oldest first; a new
    /// conversation is refused only when every gate is in use.
    #[tokio::test]
    async fn the_table_stays_within_max_conversations() {
        let gates = gates(Limits {
            max_conversations: 32,
            max_inflight: 10_000,
            ..Limits::default()
        });
        for i in 0..5_000 {
            drop(gates.acquire(&format!("flood-{i}"), "r").await.unwrap());
        }
        // 32 spread over 16 shards: at most 2 per shard.
        assert!(gates.known_gates() <= 32, "{}", gates.known_gates());
        // Held gates are never evicted: fill every slot with a holder...
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..200 {
            let name = format!("held-{i}");
            match gates.acquire(&name, "r").await {
                Ok(p) => held.push((name, p)),
                Err(Rejected::TableFull { limit }) => {
                    assert_eq!(limit, 32);
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!held.is_empty() && held.len() <= 32, "{} held", held.len());
        assert_eq!(refused, 200 - held.len());
        assert!(gates.known_gates() <= 32);
        // ...while a conversation already in the table still queues behind itself (it is not
        // refused: it needs no new gate).
        let again = gates.acquire(&held[0].0, "r");
        assert!(tokio::time::timeout(Duration::from_millis(50), again)
            .await
            .is_err());
        drop(held);
        assert_idle(&gates);
        assert!(gates.acquire("after", "r").await.is_ok());
    }

    /// The shard forgets its gates in the order they went idle, skipping those used since,
    /// and its idle list stays bounded however often gates go idle.
    #[test]
    fn the_longest_idle_gate_goes_first() {
        let mut shard = Shard::default();
        let key = |k: &str| -> Arc<str> { Arc::from(k) };
        for k in ["a", "b", "c"] {
            shard.map.insert(
                key(k),
                Entry {
                    key: key(k),
                    slots: Arc::new(Semaphore::new(1)),
                    users: 1,
                    queued: 0,
                    held: 0,
                    idle_since: Instant::now(),
                    idle_gen: 0,
                },
            );
        }
        let idle = |shard: &mut Shard, k: &str| {
            let e = shard.map.get_mut(k).unwrap();
            e.users = 0;
            e.idle_gen += 1;
            let g = e.idle_gen;
            shard.went_idle(&key(k), g);
        };
        idle(&mut shard, "b");
        idle(&mut shard, "a");
        idle(&mut shard, "c");
        // b is used again, then goes idle last.
        shard.map.get_mut("b").unwrap().users = 1;
        idle(&mut shard, "b");
        let mut order = Vec::new();
        while shard.evict_longest_idle() {
            let left: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|k| !shard.map.contains_key(*k) && !order.contains(k))
                .collect();
            order.extend(left);
        }
        assert_eq!(order, ["a", "c", "b"]);
        // A gate in use is never taken.
        shard.map.insert(
            key("d"),
            Entry {
                key: key("d"),
                slots: Arc::new(Semaphore::new(1)),
                users: 1,
                queued: 0,
                held: 1,
                idle_since: Instant::now(),
                idle_gen: 0,
            },
        );
        assert!(!shard.evict_longest_idle());
        // 10,000 idle spells of one gate leave a short list.
        for _ in 0..10_000 {
            shard.map.get_mut("d").unwrap().users = 1;
            idle(&mut shard, "d");
        }
        assert!(
            shard.idle.len() <= 2 * shard.map.len() + 65,
            "{}",
            shard.idle.len()
        );
        assert!(shard.evict_longest_idle());
        assert!(shard.map.is_empty());
    }
}
