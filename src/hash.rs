//! The hasher of the tables every request looks up (the gates, the conversation view, the
//! count memo, pruning's per-request maps).

/// foldhash (hashbrown's own default), seeded per process and per table: several times
/// cheaper than the standard SipHash on the request path's short keys. Its seed keeps a
/// client from choosing colliding conversation ids offline; foldhash claims no more than that
/// ("minimally DoS-resistant"), which suits keys that are bounded in length (ids of at most
/// 128 bytes) and tables that are bounded in size.
pub type Seeded = foldhash::fast::RandomState;
