//! The pruning policy: units, turns, the pinned part, the cache-stable cut, overflow.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::dialect::Dialect;
use crate::hash::Seeded;
use crate::prune::elide::elide_message;
use crate::prune::memo::Tag;
use crate::prune::request::{count_chars, ChatRequest, Flat, Meta};
use crate::prune::tokens::{estimate_bytes, Counter, Encoding};
use crate::prune::view::{ConvState, Elided, Entry, StateKey, View};
use crate::prune::{Budget, Mode, OnOverflow, Outcome, Rejection, Summary};
use crate::state::shared::SharedConv;

/// Bodies from this size on leave their layout in the view, for the next request of their
/// conversation to parse only what is new.
pub const LAYOUT_MIN_BYTES: usize = 16 * 1024;

/// Prunes `req` to `budget`, using and updating `view`'s knowledge of `conversation`.
///
/// Pure apart from the view (an in-memory cache): no I/O. Never panics. Long counts can
/// take milliseconds: the proxy runs big bodies on a blocking thread.
pub fn prune(
    req: &ChatRequest,
    budget: &Budget,
    view: &View,
    conversation: &str,
    counter: &Counter,
) -> Outcome {
    prune_shared(req, budget, view, conversation, counter, None)
}

/// [`prune`], with the conversation's shared view entry (`[state] backend = "redis"`): when
/// the view's own entry is not that one (another replica wrote it since), the shared one is
/// adopted first, so the cut is the one the other replica kept.
pub fn prune_shared(
    req: &ChatRequest,
    budget: &Budget,
    view: &View,
    conversation: &str,
    counter: &Counter,
    shared: Option<&SharedConv>,
) -> Outcome {
    let with = With {
        shared,
        ..With::default()
    };
    prune_with(req, budget, view, conversation, counter, with).0
}

/// What pruning may use besides the request and the view.
#[derive(Debug, Default, Clone, Copy)]
pub struct With<'a> {
    /// The conversation's shared view entry (`[state] backend = "redis"`).
    pub shared: Option<&'a SharedConv>,
    /// ctxgate's summary of what an earlier cut dropped: pinned after the system prefix while
    /// the cut stays where it was made for, and counted against the limit.
    pub pin: Option<&'a Pin>,
    /// When the cut moves, hand back what it dropped ([`Dropped`]), for a summary.
    pub want_dropped: bool,
}

/// ctxgate's summary of what a cut dropped, as a message ready to pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Identity of the cut the summary was made for ([`cut_id`]: the whole history up to and
    /// including the first kept message, so only this conversation's own history matches):
    /// it is pinned only while the cut stays there.
    pub cut_id: u64,
    /// The message, JSON in the request's dialect.
    pub raw: String,
    /// Its tokens, counted as the request's messages are.
    pub tokens: u64,
}

/// What a moved cut dropped, oldest first: the span a summary is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The span begins at the previous cut, where the pinned summary ([`With::pin`]) ends:
    /// that summary and this span together cover everything dropped.
    pub after_pin: bool,
    /// The dropped messages' JSON as received, oldest first.
    pub messages: Vec<String>,
    /// Their tokens (exact where counted, else estimated).
    pub tokens: u64,
    /// Identity of the new cut ([`cut_id`]).
    pub cut_id: u64,
}

/// [`prune_shared`] with a pinned summary and, when asked, what a moved cut dropped.
pub fn prune_with(
    req: &ChatRequest,
    budget: &Budget,
    view: &View,
    conversation: &str,
    counter: &Counter,
    with: With<'_>,
) -> (Outcome, Option<Dropped>) {
    let shared = with.shared;
    let enc = req.encoding(counter, budget.default_encoding);
    let key = StateKey {
        enc,
        min_file_lines: budget.min_file_lines,
        dialect: req.dialect(),
    };
    let prev = view.get(conversation).filter(|s| s.key == key);
    let prev = match shared {
        Some(sh)
            if sh.key == key.words()
                && prev.as_ref().and_then(|p| p.origin) != Some((sh.writer, sh.version)) =>
        {
            Some(Arc::new(ConvState::from_shared(sh, req, key)))
        }
        _ => prev,
    };
    let mut w = Work::new(req, budget, counter, enc, prev.as_deref());
    w.pin = with.pin;
    w.want_dropped = with.want_dropped;
    view.record(w.view_hit);
    let outcome = w.run(prev.as_deref().and_then(|p| p.cut));
    let dropped = w.dropped.take();
    view.put(conversation, w.into_state(key));
    (outcome, dropped)
}

struct Work<'a> {
    req: &'a ChatRequest,
    budget: &'a Budget,
    counter: &'a Counter,
    enc: Encoding,
    entries: Vec<Entry>,
    values: Vec<Option<Value>>,
    /// Leading positions whose message equals the view's.
    matched: usize,
    view_hit: bool,
    fixed_fp: u64,
    fixed_extra: u64,
    sys_end: usize,
    /// Units as `[start, end)` message ranges, over `sys_end..n`.
    units: Vec<(usize, usize)>,
    unit_of: Vec<usize>,
    turn_of: Vec<usize>,
    turns: usize,
    task_unit: Option<usize>,
    /// Units kept whatever the budget, besides the newest: the task's, every unit holding a
    /// system/developer message (wherever it stands), and the newest turn's newest tool
    /// exchange (a later system note or reminder does not unpin it).
    pinned: Vec<bool>,
    cut: Option<(usize, u64)>,
    /// Whether the pinned figure in a rejection is exact (counting stops past the limit).
    pinned_exact: bool,
    pin: Option<&'a Pin>,
    /// Where this request holds the cut the pin was made for.
    pin_at: Option<usize>,
    /// The pin was made for an earlier cut of this history and rides this move (message cap
    /// only).
    stale_pin: bool,
    want_dropped: bool,
    dropped: Option<Dropped>,
}

impl<'a> Work<'a> {
    fn new(
        req: &'a ChatRequest,
        budget: &'a Budget,
        counter: &'a Counter,
        enc: Encoding,
        prev: Option<&ConvState>,
    ) -> Work<'a> {
        let n = req.message_count();
        let msgs = req.messages();
        // Leading messages equal to the view's (a conversation grown by a turn: all but the
        // newest) take the view's entries as they are, without a look-up.
        let matched = prev.map_or(0, |p| {
            msgs.iter()
                .zip(&p.msgs)
                .take_while(|(m, e)| m.fp == e.fp)
                .count()
        });
        let mut entries: Vec<Entry> = Vec::with_capacity(n);
        let mut values: Vec<Option<Value>> = Vec::with_capacity(n);
        if let Some(p) = prev {
            entries.extend_from_slice(&p.msgs[..matched]);
            values.resize(matched, None);
        }
        // The rest: messages the view has seen elsewhere (an edited history, a message
        // moved) keep their counts; new ones are parsed for their facts.
        let known: HashMap<u64, &Entry, Seeded> = match prev {
            Some(p) if matched < n => p.msgs[matched..].iter().map(|e| (e.fp, e)).collect(),
            _ => HashMap::default(),
        };
        let mut reused = matched;
        for (i, m) in msgs.iter().enumerate().skip(matched) {
            if let Some(e) = known.get(&m.fp) {
                reused += 1;
                entries.push((*e).clone());
                values.push(None);
                continue;
            }
            // A flat message (strings only, most of them) needs no tree: its count reads it
            // again from the body.
            let (meta, v) = match Flat::parse(req.raw(i)) {
                Some(f) => (Meta::of_flat(req.dialect(), &f), None),
                None => {
                    let v: Value = serde_json::from_slice(req.raw(i)).unwrap_or(Value::Null);
                    (Meta::of(req.dialect(), &v), Some(v))
                }
            };
            crate::pace::pace_by(16);
            entries.push(Entry {
                fp: m.fp,
                meta: Arc::new(meta),
                tokens: None,
                elided: None,
            });
            values.push(v);
        }
        let fixed_fp = req.fixed_fp();
        let fixed_extra = match prev.and_then(|p| p.fixed) {
            Some((fp, t)) if fp == fixed_fp => t,
            _ => {
                let tag = Tag {
                    enc,
                    dialect: req.dialect(),
                    fixed: true,
                };
                let bytes = req.fixed_bytes();
                counter
                    .memoised(fixed_fp, tag, &bytes, || {
                        (req.fixed_extra_tokens(counter, enc), true)
                    })
                    .0
            }
        };
        let mut w = Work {
            req,
            budget,
            counter,
            enc,
            entries,
            values,
            matched,
            view_hit: reused > 0,
            fixed_fp,
            fixed_extra,
            pinned_exact: true,
            sys_end: 0,
            units: Vec::new(),
            unit_of: vec![0; n],
            turn_of: vec![0; n],
            turns: 0,
            task_unit: None,
            pinned: Vec::new(),
            cut: prev.and_then(|p| p.cut),
            pin: None,
            pin_at: None,
            stale_pin: false,
            want_dropped: false,
            dropped: None,
        };
        w.structure();
        w
    }

    /// Leading system messages, units, turns and the task.
    fn structure(&mut self) {
        let n = self.entries.len();
        self.sys_end = self.entries.iter().take_while(|e| e.meta.system).count();
        let mut link_end: Vec<usize> = (0..n).collect();
        let mut call_at: HashMap<&str, usize, Seeded> = HashMap::default();
        let mut legacy_call: Option<usize> = None;
        for i in self.sys_end..n {
            let meta = &self.entries[i].meta;
            for id in &meta.answers {
                if let Some(&c) = call_at.get(id.as_str()) {
                    link_end[c] = link_end[c].max(i);
                }
            }
            if meta.legacy_result {
                if let Some(c) = legacy_call {
                    link_end[c] = link_end[c].max(i);
                }
            }
            for id in &meta.calls {
                call_at.insert(id.as_str(), i);
            }
            if meta.legacy_call {
                legacy_call = Some(i);
            }
            if meta.joins_next && i + 1 < n {
                link_end[i] = link_end[i].max(i + 1);
            }
        }
        let mut i = self.sys_end;
        while i < n {
            let start = i;
            let mut end = link_end[i];
            let mut k = i;
            while k <= end {
                end = end.max(link_end[k]);
                k += 1;
            }
            for j in start..=end {
                self.unit_of[j] = self.units.len();
            }
            self.units.push((start, end + 1));
            i = end + 1;
        }
        let mut turn = 0;
        let mut task = None;
        for i in self.sys_end..n {
            if self.entries[i].meta.genuine_user {
                turn += 1;
                task = Some(i);
            }
            self.turn_of[i] = turn;
        }
        self.turns = turn;
        self.task_unit = task.map(|t| self.unit_of[t]);
        self.pinned = vec![false; self.units.len()];
        if let Some(t) = self.task_unit {
            self.pinned[t] = true;
        }
        let mut newest_exchange = None;
        for (u, &(start, end)) in self.units.iter().enumerate() {
            let metas = || self.entries[start..end].iter().map(|e| &e.meta);
            if metas().any(|m| m.system) {
                self.pinned[u] = true;
            }
            if metas().any(|m| !m.calls.is_empty() || m.legacy_call) {
                newest_exchange = Some(u);
            }
        }
        // The newest tool exchange of the newest turn: the work the agent is in the middle
        // of, even when a system note or reminder came after it (those open no turn).
        if let Some(u) = newest_exchange.filter(|&u| self.task_unit.is_none_or(|t| u >= t)) {
            self.pinned[u] = true;
        }
    }

    /// The pinned units older than the newest, oldest first.
    fn pinned_before(&self, unit: usize) -> impl Iterator<Item = usize> + '_ {
        (0..unit).filter(|&u| self.pinned[u])
    }

    fn value(&mut self, i: usize) -> &Value {
        if self.values[i].is_none() {
            let v = serde_json::from_slice(self.req.raw(i)).unwrap_or(Value::Null);
            self.values[i] = Some(v);
        }
        self.values[i].as_ref().unwrap_or(&Value::Null)
    }

    /// Tokens of message `i` as received; stops early past `cap` (then not exact).
    fn orig(&mut self, i: usize, cap: u64) -> (u64, bool) {
        if let Some(t) = self.entries[i].tokens {
            return (t, true);
        }
        let (counter, enc, dialect) = (self.counter, self.enc, self.req.dialect());
        let tag = Tag {
            enc,
            dialect,
            fixed: false,
        };
        let req = self.req;
        let fp = req.messages()[i].fp;
        let (t, exact) = counter.memoised(fp, tag, req.raw(i), || {
            let flat = match self.values[i] {
                None => Flat::parse(req.raw(i)),
                Some(_) => None,
            };
            match flat {
                Some(f) => counter.count_flat(enc, dialect, &f, cap),
                None => counter.count_message(enc, dialect, self.value(i), cap),
            }
        });
        if exact {
            self.entries[i].tokens = Some(t);
        }
        (t, exact)
    }

    /// Whether message `i`'s file contents are elided (older turn, not the newest unit).
    fn eligible(&self, i: usize) -> bool {
        let newest = self.units.len().saturating_sub(1);
        i >= self.sys_end
            && self.unit_of[i] != newest
            && self.turn_of[i] + (self.budget.keep_file_content_turns as usize) <= self.turns
    }

    fn elided(&mut self, i: usize) -> Arc<Elided> {
        if let Some(e) = &self.entries[i].elided {
            return Arc::clone(e);
        }
        let (counter, enc, dialect) = (self.counter, self.enc, self.req.dialect());
        let min_lines = self.budget.min_file_lines;
        let mut v = self.value(i).clone();
        let files = elide_message(&mut v, dialect, min_lines, counter, enc);
        let e = if files == 0 {
            let (t, _) = self.orig(i, u64::MAX);
            Elided {
                raw: None,
                tokens: t,
                files: 0,
            }
        } else {
            let (t, _) = counter.count_message(enc, dialect, &v, u64::MAX);
            let raw = serde_json::to_string(&v)
                .ok()
                .and_then(|s| RawValue::from_string(s).ok());
            match raw {
                Some(raw) => Elided {
                    raw: Some(raw),
                    tokens: t,
                    files,
                },
                None => {
                    let (t, _) = self.orig(i, u64::MAX);
                    Elided {
                        raw: None,
                        tokens: t,
                        files: 0,
                    }
                }
            }
        };
        let e = Arc::new(e);
        self.entries[i].elided = Some(Arc::clone(&e));
        e
    }

    /// Tokens of message `i` as it would be forwarded; stops early past `cap`.
    fn pruned(&mut self, i: usize, cap: u64) -> (u64, bool) {
        if !self.eligible(i) {
            return self.orig(i, cap);
        }
        if self.entries[i].elided.is_none() {
            // A message that cannot fit even before counting its files is not elided yet:
            // eliding means counting every file in it exactly.
            let (t, exact) = self.orig(i, cap);
            if !exact && !self.has_file_hint(i) {
                return (t, false);
            }
        }
        let e = self.elided(i);
        (e.tokens, true)
    }

    fn has_file_hint(&self, i: usize) -> bool {
        let raw = self.req.raw(i);
        [
            &b"```"[..],
            b"~~~",
            b"BEGIN FILE:",
            b"<file",
            b"\"image",
            b"\"file",
            b"\"document",
            b"\"input_audio",
        ]
        .iter()
        .any(|hint| memchr::memmem::find(raw, hint).is_some())
    }

    fn unit_len(&self, u: usize) -> usize {
        self.units[u].1 - self.units[u].0
    }

    /// Tokens of unit `u` as forwarded; stops early past `cap`.
    fn unit_pruned(&mut self, u: usize, cap: u64) -> (u64, bool) {
        let (s, e) = self.units[u];
        let mut total = 0u64;
        for i in s..e {
            let (t, exact) = self.pruned(i, cap.saturating_sub(total));
            total += t;
            if !exact {
                return (total, false);
            }
        }
        (total, true)
    }

    /// Whether the first kept message that is not a system message, with the cut at
    /// `cut_unit`, is a user message (Anthropic requires it).
    fn first_is_user(&self, cut_unit: usize) -> bool {
        let n = self.entries.len();
        let kept = self
            .pinned_before(cut_unit)
            .flat_map(|u| self.units[u].0..self.units[u].1)
            .chain(self.units[cut_unit].0..n);
        kept.map(|i| &self.entries[i].meta)
            .find(|m| !m.system)
            .is_none_or(|m| m.user)
    }

    fn run(&mut self, prev_cut: Option<(usize, u64)>) -> Outcome {
        let n = self.entries.len();
        let limit = self.budget.limit(self.req).tokens;
        let cap_msgs = match self.budget.max_messages {
            0 => usize::MAX,
            m => usize::try_from(m).unwrap_or(usize::MAX),
        };
        let chars_before: usize = self.req.messages().iter().map(|m| m.chars).sum();

        // 1. Count, newest first; exact only while within the limit.
        let (fixed, before, before_exact) = self.count_before(limit);
        let base = Summary {
            tokens_before: before,
            tokens_before_exact: before_exact,
            tokens_after: before,
            messages_before: n,
            messages_after: n,
            messages_dropped: 0,
            files_elided: 0,
            chars_before,
            chars_after: chars_before,
            cut_moved: false,
            view_hit: self.view_hit,
            overflow_forwarded: false,
            truncated: false,
            summary_tokens: 0,
        };

        // 2. Within budget and cap: forward the original bytes.
        if before <= limit && n <= cap_msgs {
            return Outcome::Unchanged(base);
        }
        if self.units.is_empty() {
            // Only system messages: nothing can go.
            return self.overflow(base, fixed, limit);
        }

        // 3–4. Pinned part, then the cut: kept where it is if everything from it still fits,
        // else moved in one step down to the target.
        let (pinned, pinned_msgs, pinned_exact) = self.pinned(fixed, limit);
        if pinned > limit {
            self.pinned_exact = pinned_exact;
            return self.overflow(base, pinned, limit);
        }
        // Where this request holds the cut the summary was made for (none: it is not this
        // history's). The summary pinned for the view's cut counts against the limit: a cut
        // that fits only without it moves.
        self.pin_at = self.pin.and_then(|p| self.find_cut(p.cut_id));
        let pin_msg = usize::from(self.req.dialect() != Dialect::Anthropic);
        let extra = match (self.pin, self.pin_at, prev_cut) {
            (Some(p), Some(j), Some((idx, fp)))
                if j == idx && self.entries.get(idx).is_some_and(|e| e.fp == fp) =>
            {
                (p.tokens, pin_msg)
            }
            _ => (0, 0),
        };
        let pinned = (pinned, pinned_msgs);
        let with_pin = (pinned.0 + extra.0, pinned.1 + extra.1);
        let kept = self.kept_cut(prev_cut, with_pin, limit, cap_msgs);
        let (cut_unit, moved) = match kept {
            Some(cu) => (cu, false),
            None => {
                // Under a message cap the cut moves every turn, so a summary would never ride
                // if it waited for its own cut to stay: this history's summary of an earlier
                // cut (all but what was dropped since) rides the move, with room kept for it.
                self.stale_pin = cap_msgs != usize::MAX && self.pin_at.is_some();
                let room = match self.pin.filter(|_| self.stale_pin) {
                    Some(p) => (pinned.0 + p.tokens, pinned.1 + pin_msg),
                    None => pinned,
                };
                let cu = self.new_cut(room, limit, cap_msgs);
                (cu, prev_cut.map(|c| c.0) != Some(self.units[cu].0))
            }
        };
        let start = self.units[cut_unit].0;
        self.cut = Some((start, self.entries[start].fp));

        // Build the kept list.
        let mut kept: Vec<usize> = (0..self.sys_end).collect();
        for u in self.pinned_before(cut_unit).collect::<Vec<_>>() {
            kept.extend(self.units[u].0..self.units[u].1);
        }
        kept.extend(start..n);
        if moved && self.want_dropped {
            // A first cut that only elided files drops nothing.
            self.dropped = Some(self.dropped_span(start, &kept)).filter(|d| !d.messages.is_empty());
        }
        self.finish(base, kept, fixed, moved, (limit, cap_msgs))
    }

    /// What the cut at `start` drops that no summary covers: from the cut the summary was made
    /// for when this request holds it (however many moves ago that was: a summary not ready in
    /// time, or one that failed, loses nothing), else from the first history message; pinned
    /// units stay.
    fn dropped_span(&mut self, start: usize, kept: &[usize]) -> Dropped {
        let after_pin = self.pin_at.is_some_and(|j| j < start);
        let from = match self.pin_at {
            Some(j) if after_pin => j,
            _ => self.sys_end,
        };
        let mut messages = Vec::new();
        let mut tokens = 0;
        for i in from..start {
            if kept.binary_search(&i).is_ok() {
                continue;
            }
            tokens += match self.entries[i].tokens {
                Some(t) => t,
                None => estimate_bytes(self.req.raw(i).len()),
            };
            messages.push(String::from_utf8_lossy(self.req.raw(i)).into_owned());
        }
        Dropped {
            after_pin,
            messages,
            tokens,
            cut_id: self.cut_id(start),
        }
    }

    /// The identity of a cut at message `idx` ([`cut_id`] over this request's fingerprints).
    fn cut_id(&self, idx: usize) -> u64 {
        cut_id(
            self.entries[..=idx.min(self.entries.len().saturating_sub(1))]
                .iter()
                .map(|e| e.fp),
        )
    }

    /// The history position whose cut identity is `id`, if this request holds it.
    fn find_cut(&self, id: u64) -> Option<usize> {
        let mut h = CUT_SEED;
        for (i, e) in self.entries.iter().enumerate() {
            h = xxhash_rust::xxh3::xxh3_64_with_seed(&e.fp.to_le_bytes(), h);
            if h == id && i >= self.sys_end {
                return Some(i);
            }
        }
        None
    }

    /// The system part's tokens, then the whole prompt's, counted newest first and exactly
    /// only while within `limit` (older messages: cached counts, else a bytes estimate).
    /// Returns (system part, whole prompt, whether the whole is exact).
    fn count_before(&mut self, limit: u64) -> (u64, u64, bool) {
        let n = self.entries.len();
        let mut fixed = self.fixed_extra;
        for i in 0..self.sys_end {
            fixed += self.orig(i, u64::MAX).0;
        }
        let mut before = fixed;
        let mut before_exact = true;
        for i in (self.sys_end..n).rev() {
            if before <= limit {
                let (t, exact) = self.orig(i, limit - before);
                before += t;
                before_exact &= exact;
            } else if let Some(t) = self.entries[i].tokens {
                before += t;
            } else {
                before += estimate_bytes(self.req.raw(i).len());
                before_exact = false;
            }
        }
        (fixed, before, before_exact)
    }

    /// The pinned part: the system part, the newest unit and the task. Returns (tokens,
    /// messages, whether the count is exact).
    fn pinned(&mut self, fixed: u64, limit: u64) -> (u64, usize, bool) {
        let newest = self.units.len() - 1;
        // When an over-limit pinned part means rejection, counting stops as soon as the limit
        // is passed: a pathological message (a million repeats of one character) then costs
        // about as much as the budget, not as much as the message. Truncate and forward need
        // the exact figure.
        let reject = self.budget.on_overflow == OnOverflow::Reject;
        let cap = |used: u64| {
            if reject {
                limit.saturating_sub(used)
            } else {
                u64::MAX
            }
        };
        let (t, mut pinned_exact) = self.unit_pruned(newest, cap(fixed));
        let mut pinned = fixed + t;
        let mut pinned_msgs = self.sys_end + self.unit_len(newest);
        for u in self.pinned_before(newest).collect::<Vec<_>>() {
            if pinned_exact {
                let (t, exact) = self.unit_pruned(u, cap(pinned));
                pinned += t;
                pinned_exact = exact;
            }
            pinned_msgs += self.unit_len(u);
        }
        (pinned, pinned_msgs, pinned_exact)
    }

    /// The view's cut, as a unit, if it is still a valid cut of this request and everything
    /// from it (with the pinned part, `(tokens, messages)`) fits the limit and the cap.
    fn kept_cut(
        &mut self,
        prev_cut: Option<(usize, u64)>,
        (pinned, pinned_msgs): (u64, usize),
        limit: u64,
        cap_msgs: usize,
    ) -> Option<usize> {
        let (idx, fp) = prev_cut?;
        let n = self.entries.len();
        let newest = self.units.len() - 1;
        let anthropic = self.req.dialect() == Dialect::Anthropic;
        let valid = idx < n
            && idx < self.matched
            && self.entries[idx].fp == fp
            && idx >= self.sys_end
            && self.units[self.unit_of[idx]].0 == idx
            && (!anthropic || self.first_is_user(self.unit_of[idx]));
        if !valid {
            return None;
        }
        let cu = self.unit_of[idx];
        let (mut total, mut msgs) = (pinned, pinned_msgs);
        for u in cu..newest {
            if self.pinned[u] {
                continue;
            }
            msgs += self.unit_len(u);
            if msgs > cap_msgs {
                return None;
            }
            let (t, exact) = self.unit_pruned(u, limit.saturating_sub(total));
            total += t;
            if !exact || total > limit {
                return None;
            }
        }
        Some(cu)
    }

    /// A new cut: units are kept newest first while they fit the target and the cap, and
    /// never past the first that does not (the kept history stays one contiguous tail).
    fn new_cut(
        &mut self,
        (pinned, pinned_msgs): (u64, usize),
        limit: u64,
        cap_msgs: usize,
    ) -> usize {
        let newest = self.units.len() - 1;
        // With summaries on, a new cut leaves room for the summary to come.
        let reserve = if self.want_dropped {
            self.budget.summary.max_tokens.saturating_add(64)
        } else {
            0
        };
        let target = self
            .budget
            .target_tokens
            .min(limit)
            .min(limit.saturating_sub(reserve).max(limit / 2));
        let (mut total, mut msgs) = (pinned, pinned_msgs);
        let mut cu = newest;
        for u in (0..newest).rev() {
            if self.pinned[u] {
                cu = u;
                continue;
            }
            if msgs + self.unit_len(u) > cap_msgs {
                break;
            }
            let (t, exact) = self.unit_pruned(u, target.saturating_sub(total));
            if !exact || total + t > target {
                break;
            }
            total += t;
            msgs += self.unit_len(u);
            cu = u;
        }
        if self.req.dialect() == Dialect::Anthropic {
            while cu < newest && !self.first_is_user(cu) {
                cu += 1;
            }
        }
        cu
    }

    /// Serialises the kept messages and fills in the summary.
    fn finish(
        &mut self,
        base: Summary,
        kept: Vec<usize>,
        fixed: u64,
        moved: bool,
        (limit, cap_msgs): (u64, usize),
    ) -> Outcome {
        let mut after = fixed - self.sys_tokens();
        let mut files = 0;
        let mut chars_after = 0;
        let mut raws: Vec<Option<Arc<Elided>>> = Vec::with_capacity(kept.len());
        for &i in &kept {
            if self.eligible(i) {
                let e = self.elided(i);
                after += e.tokens;
                files += e.files;
                chars_after += match &e.raw {
                    Some(r) => count_chars(r.get()),
                    None => self.req.messages()[i].chars,
                };
                raws.push(Some(e));
            } else {
                after += self.orig(i, u64::MAX).0;
                chars_after += self.req.messages()[i].chars;
                raws.push(None);
            }
        }
        let dropped = base.messages_before - kept.len();
        if dropped == 0 && files == 0 {
            return Outcome::Unchanged(base);
        }
        // The summary made for this cut, after the system prefix, when it fits: a message of
        // its own, or (Anthropic, whose turns must alternate and begin with the user) a text
        // block at the head of the first kept user message.
        let req = self.req;
        let sys_end = self.sys_end;
        let mut texts: Vec<Cow<'_, [u8]>> = kept
            .iter()
            .zip(&raws)
            .map(|(&i, e)| match e.as_ref().and_then(|e| e.raw.as_ref()) {
                Some(r) => Cow::Borrowed(r.get().as_bytes()),
                None => Cow::Borrowed(req.raw(i)),
            })
            .collect();
        let here = self.cut.map(|(idx, _)| self.cut_id(idx));
        let stale = self.stale_pin && self.pin_at.zip(self.cut).is_some_and(|(j, (s, _))| j <= s);
        let mut inserted: Option<&[u8]> = None;
        let (mut pin_tokens, mut pin_chars) = (0, 0);
        if let Some(p) = self
            .pin
            .filter(|p| dropped > 0 && (Some(p.cut_id) == here || stale))
        {
            if req.dialect() == Dialect::Anthropic {
                let merged = texts
                    .get(sys_end)
                    .and_then(|t| merge_block(t, &p.raw, self.counter, self.enc));
                if let Some((bytes, delta)) = merged.filter(|(_, d)| after + d <= limit) {
                    texts[sys_end] = Cow::Owned(bytes);
                    (pin_tokens, pin_chars) = (delta, count_chars(&p.raw));
                }
            } else if after + p.tokens <= limit && kept.len() < cap_msgs {
                inserted = Some(p.raw.as_bytes());
                (pin_tokens, pin_chars) = (p.tokens, count_chars(&p.raw));
            }
        }
        let summary = Summary {
            tokens_after: after + pin_tokens,
            messages_after: kept.len() + usize::from(inserted.is_some()),
            messages_dropped: dropped,
            files_elided: files,
            chars_after: chars_after + pin_chars,
            cut_moved: moved,
            summary_tokens: pin_tokens,
            ..base
        };
        if self.budget.mode == Mode::Shadow {
            return Outcome::Shadow(summary);
        }
        let texts = texts[..sys_end]
            .iter()
            .map(|t| t.as_ref())
            .chain(inserted)
            .chain(texts[sys_end..].iter().map(|t| t.as_ref()));
        let body = req.serialise(texts, None);
        Outcome::Pruned { body, summary }
    }

    fn sys_tokens(&mut self) -> u64 {
        (0..self.sys_end).map(|i| self.orig(i, u64::MAX).0).sum()
    }

    /// The pinned part alone is over the limit.
    fn overflow(&mut self, base: Summary, pinned: u64, limit: u64) -> Outcome {
        let at_least = if self.pinned_exact { "" } else { "at least " };
        let reject = |pinned: u64| {
            let key = if self.budget.limit(self.req).reserved {
                "prune.hard_token_limit minus the request's max_tokens, prune.reserve_output"
            } else {
                "prune.hard_token_limit"
            };
            Outcome::Rejected(Rejection {
                pinned_tokens: pinned,
                limit,
                message: format!(
                    "prompt needs {at_least}{pinned} tokens for its pinned part (system, tools, task, newest tool exchange and newest message), over the limit of {limit} ({key})"
                ),
            })
        };
        match self.budget.on_overflow {
            OnOverflow::Reject => reject(pinned),
            OnOverflow::Forward => {
                let n = self.entries.len();
                let mut total = self.fixed_extra;
                for i in 0..n {
                    total += self.orig(i, u64::MAX).0;
                }
                let summary = Summary {
                    tokens_before: total,
                    tokens_before_exact: true,
                    tokens_after: total,
                    overflow_forwarded: true,
                    ..base
                };
                if self.budget.mode == Mode::Shadow {
                    return Outcome::Shadow(summary);
                }
                Outcome::Unchanged(summary)
            }
            OnOverflow::Truncate => match self.truncate(base, limit) {
                Some(o) => o,
                None => reject(pinned),
            },
        }
    }

    /// Keeps only the pinned messages and cuts their largest texts from the middle.
    fn truncate(&mut self, base: Summary, limit: u64) -> Option<Outcome> {
        let n = self.entries.len();
        let mut kept: Vec<usize> = (0..self.sys_end).collect();
        if let Some(newest) = self.units.len().checked_sub(1) {
            for u in self.pinned_before(newest).collect::<Vec<_>>() {
                kept.extend(self.units[u].0..self.units[u].1);
            }
            kept.extend(self.units[newest].0..n);
        }
        let mut vals: Vec<Value> = Vec::with_capacity(kept.len());
        for &i in &kept {
            let v = if self.eligible(i) {
                let e = self.elided(i);
                match &e.raw {
                    Some(r) => serde_json::from_str(r.get()).unwrap_or(Value::Null),
                    None => self.value(i).clone(),
                }
            } else {
                self.value(i).clone()
            };
            vals.push(v);
        }
        let (counter, enc, dialect) = (self.counter, self.enc, self.req.dialect());
        let req = self.req;
        let count = |v: &Value| counter.count_message(enc, dialect, v, u64::MAX).0;
        let mut tokens: Vec<u64> = vals.iter().map(count).collect();
        // The system prompt field (Anthropic `system`, Responses `instructions`) is cut like a
        // message's text: it rides at the end of `vals` as `{"content": …}`, outside the
        // fixed part it is otherwise counted in.
        let mut fixed = self.fixed_extra;
        let field = req.system_field();
        if let Some((_, v)) = &field {
            let t = req.system_field_tokens(counter, enc, v);
            fixed = fixed.saturating_sub(t);
            vals.push(serde_json::json!({ "content": v }));
            kept.push(usize::MAX);
            tokens.push(t);
        }
        let recount = |k: usize, v: &Value, n: usize| match &field {
            Some(_) if k + 1 == n => req.system_field_tokens(counter, enc, &v["content"]),
            _ => count(v),
        };
        let mut cut_any = false;
        for _ in 0..24 {
            let total = fixed + tokens.iter().sum::<u64>();
            if total <= limit {
                break;
            }
            let excess = total - limit;
            let (k, path) = self.largest_text(&vals, &kept)?;
            let s = match get_mut(&mut vals[k], &path) {
                Some(Value::String(s)) => s,
                _ => return None,
            };
            cut_middle(counter, enc, s, excess);
            tokens[k] = recount(k, &vals[k], vals.len());
            cut_any = true;
        }
        let total = fixed + tokens.iter().sum::<u64>();
        if total > limit || !cut_any {
            return None;
        }
        let replaced = field.as_ref().and_then(|(key, _)| {
            kept.pop();
            let v = vals.pop()?;
            Some((
                *key,
                serde_json::to_string(&v["content"]).unwrap_or_default(),
            ))
        });
        let texts: Vec<String> = vals
            .iter()
            .map(|v| serde_json::to_string(v).unwrap_or_default())
            .collect();
        let chars_after = texts.iter().map(|t| count_chars(t)).sum();
        let summary = Summary {
            tokens_after: total,
            messages_after: kept.len(),
            messages_dropped: n - kept.len(),
            chars_after,
            truncated: true,
            cut_moved: false,
            ..base
        };
        if self.budget.mode == Mode::Shadow {
            return Some(Outcome::Shadow(summary));
        }
        let replace = replaced.as_ref().map(|(k, v)| (*k, v.as_str()));
        let body = self
            .req
            .serialise(texts.iter().map(String::as_bytes), replace);
        Some(Outcome::Pruned { body, summary })
    }

    /// The largest text (over 64 bytes) among the kept messages' contents: non-system
    /// messages first, system messages only when no other has one. Returns (index in `vals`,
    /// path to the string).
    fn largest_text(&self, vals: &[Value], kept: &[usize]) -> Option<(usize, Vec<Seg>)> {
        let mut best: Option<(usize, Vec<Seg>, usize)> = None;
        for pass_system in [false, true] {
            for (k, v) in vals.iter().enumerate() {
                if (kept[k] < self.sys_end) != pass_system || is_opaque(v) {
                    continue;
                }
                let mut paths = Vec::new();
                for key in ["content", "output"] {
                    if let Some(c) = v.get(key) {
                        text_paths(c, &mut vec![Seg::Key(key.into())], &mut paths);
                    }
                }
                for (len, p) in paths {
                    if len > 64 && best.as_ref().is_none_or(|b| len > b.2) {
                        best = Some((k, p, len));
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        best.map(|(k, p, _)| (k, p))
    }

    fn into_state(self, key: StateKey) -> ConvState {
        ConvState {
            key,
            fixed: Some((self.fixed_fp, self.fixed_extra)),
            msgs: self.entries,
            cut: self.cut,
            origin: None,
            // A small body parses in microseconds: its layout would cost the view more
            // memory than it saves time.
            layout: self
                .req
                .layout()
                .filter(|_| self.req.body_len() >= LAYOUT_MIN_BYTES),
        }
    }
}

/// Seed of [`cut_id`].
const CUT_SEED: u64 = 0x6375_7469_6421;

/// The identity of a cut: a hash chained over the fingerprints of every message up to and
/// including its first kept one. Two histories share it only if they are the same up to the
/// cut, so a summary is never pinned into another conversation's, or an edited, history.
pub fn cut_id(fps: impl Iterator<Item = u64>) -> u64 {
    fps.fold(CUT_SEED, |h, fp| {
        xxhash_rust::xxh3::xxh3_64_with_seed(&fp.to_le_bytes(), h)
    })
}

/// An Anthropic user message (`message`) with the text block `block` put at the head of its
/// content — after any `tool_result` blocks, which the API wants first — and the tokens that
/// added; `None` for anything but a user message.
fn merge_block(
    message: &[u8],
    block: &str,
    counter: &Counter,
    enc: Encoding,
) -> Option<(Vec<u8>, u64)> {
    let mut v: Value = serde_json::from_slice(message).ok()?;
    if v.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let count = |v: &Value| {
        counter
            .count_message(enc, Dialect::Anthropic, v, u64::MAX)
            .0
    };
    let before = count(&v);
    let block: Value = serde_json::from_str(block).ok()?;
    if block.get("type").and_then(Value::as_str) != Some("text") {
        return None;
    }
    let content = v.get_mut("content")?;
    match content {
        Value::String(text) if text.is_empty() => *content = Value::Array(vec![block]),
        Value::String(text) => {
            let text = std::mem::take(text);
            *content = serde_json::json!([block, {"type": "text", "text": text}]);
        }
        Value::Array(items) => {
            let at = items
                .iter()
                .take_while(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                .count();
            items.insert(at, block);
        }
        _ => return None,
    }
    let delta = count(&v).saturating_sub(before);
    Some((serde_json::to_vec(&v).ok()?, delta))
}

/// A step in a JSON path.
/// A Responses item ctxgate never edits: `reasoning` (its text and signature-like encrypted
/// content are checked by the API) and `compaction` (opaque).
fn is_opaque(v: &Value) -> bool {
    matches!(
        v.get("type").and_then(Value::as_str),
        Some("reasoning" | "compaction")
    )
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Paths (and lengths) of the text strings in a message's content.
fn text_paths(v: &Value, path: &mut Vec<Seg>, out: &mut Vec<(usize, Vec<Seg>)>) {
    match v {
        Value::String(s) => out.push((s.len(), path.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                text_paths(item, path, out);
                path.pop();
            }
        }
        Value::Object(map) => {
            for key in ["text", "content"] {
                if let Some(x) = map.get(key) {
                    path.push(Seg::Key(key.to_string()));
                    text_paths(x, path, out);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn get_mut<'v>(v: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Seg::Key(k) => cur.get_mut(k.as_str())?,
            Seg::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// Cuts about `excess` tokens (plus a margin) from the middle of `s`, on char boundaries,
/// and puts a marker naming the tokens removed in their place.
fn cut_middle(counter: &Counter, enc: Encoding, s: &mut String, excess: u64) {
    let st = counter.count_text(enc, s).max(1);
    let per_token = (s.len() as f64 / st as f64).max(1.0);
    let remove = (((excess + 24) as f64) * per_token * 1.1) as usize;
    let remove = remove.min(s.len());
    let mut from = (s.len() - remove) / 2;
    while !s.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (from + remove).min(s.len());
    while !s.is_char_boundary(to) {
        to += 1;
    }
    let removed = counter.count_text(enc, &s[from..to]);
    let mark = format!("\n[ctxgate: truncated {removed} tokens]\n");
    s.replace_range(from..to, &mark);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The units of a chat body's messages.
    fn units_of(msgs: Vec<Value>) -> Vec<(usize, usize)> {
        let body = serde_json::json!({"model": "gpt-4o", "messages": msgs}).to_string();
        let req = ChatRequest::parse(Dialect::OpenAi, body.as_bytes()).unwrap();
        let c = Counter::new(Encoding::O200kBase).unwrap();
        let budget = Budget::default();
        Work::new(&req, &budget, &c, Encoding::O200kBase, None).units
    }

    fn calls(ids: &[String]) -> Value {
        let calls: Vec<Value> = ids
            .iter()
            .map(|id| serde_json::json!({"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}}))
            .collect();
        serde_json::json!({"role": "assistant", "content": null, "tool_calls": calls})
    }

    fn result(id: &str) -> Value {
        serde_json::json!({"role": "tool", "tool_call_id": id, "content": "ok"})
    }

    #[test]
    fn a_result_joins_the_unit_of_the_newest_call_that_made_its_id() {
        // 40 parallel calls; the first one's result comes last, 40 calls back: the whole
        // exchange is one unit.
        let ids: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let mut msgs = vec![
            serde_json::json!({"role": "user", "content": "go"}),
            calls(&ids),
        ];
        msgs.extend(ids[1..].iter().map(|id| result(id)));
        msgs.push(result("c0"));
        assert_eq!(units_of(msgs), [(0, 1), (1, 42)]);
        // A call id made twice: a result links to the newest call that made it.
        let ys: Vec<String> = std::iter::once("x".to_string())
            .chain((0..40).map(|i| format!("y{i}")))
            .collect();
        let mut msgs = vec![
            serde_json::json!({"role": "user", "content": "go"}),
            calls(&["x".to_string()]),
            result("x"),
            serde_json::json!({"role": "user", "content": "again"}),
            calls(&ys),
        ];
        msgs.extend(ys[1..].iter().map(|id| result(id)));
        msgs.push(result("x"));
        assert_eq!(units_of(msgs), [(0, 1), (1, 3), (3, 4), (4, 46)]);
        // Also when a message of the user stands between them.
        let msgs = vec![
            serde_json::json!({"role": "user", "content": "go"}),
            calls(&["x".to_string()]),
            result("x"),
            calls(&["x".to_string()]),
            serde_json::json!({"role": "user", "content": "between"}),
            result("x"),
        ];
        assert_eq!(units_of(msgs), [(0, 1), (1, 3), (3, 6)]);
    }

    #[test]
    fn an_anthropic_summary_block_joins_the_first_user_turn_after_its_tool_results() {
        let c = Counter::new(Encoding::O200kBase).unwrap();
        let block = r#"{"type":"text","text":"[ctxgate summary of earlier conversation]\nS"}"#;
        let merge = |m: Value| {
            let (b, delta) = merge_block(m.to_string().as_bytes(), block, &c, Encoding::O200kBase)?;
            assert!(delta > 0);
            Some(serde_json::from_slice::<Value>(&b).unwrap()["content"].clone())
        };
        let b: Value = serde_json::from_str(block).unwrap();
        assert_eq!(
            merge(serde_json::json!({"role": "user", "content": "Fix it."})).unwrap(),
            serde_json::json!([b, {"type": "text", "text": "Fix it."}])
        );
        assert_eq!(
            merge(serde_json::json!({"role": "user", "content": ""})).unwrap(),
            serde_json::json!([b])
        );
        let results = serde_json::json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
            {"type": "text", "text": "next"}]});
        assert_eq!(
            merge(results).unwrap(),
            serde_json::json!([
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                b,
                {"type": "text", "text": "next"}])
        );
        assert!(merge(serde_json::json!({"role": "assistant", "content": "x"})).is_none());
    }
}
