//! A compact byte-pair-encoding *counter* with tiktoken's exact results.
//!
//! tiktoken-rs's `CoreBPE` keeps each vocabulary three times over (encoder map, decoder map,
//! sorted token list) as one heap allocation per token, plus 128 clones of its split regexes,
//! each growing its own lazy-DFA cache on the threads that use it: ~60 MB resident for
//! o200k_base and cl100k_base together, before any traffic. ctxgate only ever *counts*, so it
//! keeps each vocabulary once, packed: every token's bytes in one arena, a rank → offset
//! table, and an open-addressing table of ranks keyed by the token's bytes (~5 MB for both).
//!
//! The algorithm is tiktoken's own, ported line by line: the same split regex (fancy-regex),
//! a whole-piece lookup first, then the pairwise merge by lowest rank (the quadratic loop for
//! pieces under 100 bytes, the heap-based one for longer pieces). The vocabularies come from
//! tiktoken-rs itself (each rank decoded once at start, on a short-lived thread whose heap is
//! then released). Tests compare the counts with tiktoken-rs's `encode_ordinary`.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashSet};
use std::sync::OnceLock;

/// A split pattern: fancy-regex for patterns that need its features, else the `regex` crate,
/// whose DFA-based search is several times faster (tiktoken's notes say 3×).
#[derive(Clone)]
enum Splitter {
    Fancy(fancy_regex::Regex),
    /// o200k_base's pattern without its one look-around (see [`Splitter::o200k`]).
    Plain(regex::Regex),
}

impl Splitter {
    /// o200k_base's pattern ends `|\s+(?!\S)|\s+`: a whitespace run followed by more text
    /// leaves its last character to the next piece. The `regex` crate has no look-ahead, so
    /// the pattern ends `|\s+` here and [`without_last_space`] gives that character back.
    fn o200k() -> Result<Splitter, String> {
        let full = tiktoken_rs::O200K_BASE_PAT_STR;
        let tail = r"|\s+(?!\S)|\s+";
        let head = full
            .strip_suffix(tail)
            .ok_or("o200k_base's split pattern has changed: cannot drop its look-ahead")?;
        regex::Regex::new(&format!("{head}|\\s+"))
            .map(Splitter::Plain)
            .map_err(|e| e.to_string())
    }
}

/// For a match of the final `\s+` alternative (whitespace only, no `\r`/`\n`: those go to
/// `\s*[\r\n]+`) of two or more characters that more text follows: its length without the
/// last character, which tiktoken's `\s+(?!\S)` leaves to the next piece.
fn without_last_space(piece: &str) -> Option<usize> {
    let (last, _) = piece.char_indices().next_back()?;
    (last > 0
        && piece
            .chars()
            .all(|c| c.is_whitespace() && c != '\r' && c != '\n'))
    .then_some(last)
}

type Rank = u32;
const NONE: Rank = Rank::MAX;

/// One vocabulary, packed, with its split pattern.
pub struct Bpe {
    /// Every token's bytes, rank after rank.
    arena: Box<[u8]>,
    /// Token `r` is `arena[offsets[r]..offsets[r + 1]]`.
    offsets: Box<[u32]>,
    /// Open addressing (linear probing) over ranks, keyed by the token's bytes.
    slots: Box<[Rank]>,
    mask: usize,
    /// Bytes of the longest token: a text of `n` bytes is at least `n / longest` tokens.
    longest: usize,
    /// The split pattern; each thread counts with its own clone (see [`Bpe::with_regex`]).
    regex: Splitter,
    /// Which thread-local regex slot is this vocabulary's.
    id: usize,
}

thread_local! {
    /// Per-thread clones of the split regexes: fancy-regex's `find_iter` from several
    /// threads on one `Regex` contends on its scratch cache (tiktoken does the same).
    static REGEXES: RefCell<Vec<Option<Splitter>>> = const { RefCell::new(Vec::new()) };
}

#[inline]
fn hash(bytes: &[u8]) -> usize {
    // FxHash-style: fast, and good enough for a table that is never adversarial (the keys
    // are the fixed vocabulary; lookups of unknown pieces just miss).
    const K: u64 = 0xf135_7aea_2e62_a9c5;
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    (h ^ (h >> 29)) as usize
}

impl Bpe {
    /// Bytes of the vocabulary's longest token.
    pub fn longest_token(&self) -> usize {
        self.longest
    }

    /// The vocabulary packed (`offsets[r]..offsets[r + 1]` in `arena` is rank `r`; empty = no
    /// such rank), with its split pattern. `id` picks the thread-local regex slot: one per
    /// vocabulary in the process.
    fn from_packed(
        arena: Vec<u8>,
        offsets: Vec<u32>,
        regex: Splitter,
        id: usize,
    ) -> Result<Bpe, String> {
        let n = offsets.len().saturating_sub(1);
        let cap = (n * 2).next_power_of_two().max(16);
        let mask = cap - 1;
        let mut slots = vec![NONE; cap];
        let tok = |r: usize| &arena[offsets[r] as usize..offsets[r + 1] as usize];
        for rank in 0..n {
            let t = tok(rank);
            if t.is_empty() {
                continue;
            }
            let mut i = hash(t) & mask;
            while slots[i] != NONE {
                if tok(slots[i] as usize) == t {
                    return Err(format!("duplicate token at rank {rank}"));
                }
                i = (i + 1) & mask;
            }
            slots[i] = rank as Rank;
        }
        let longest = (0..n).map(|r| tok(r).len()).max().unwrap_or(1).max(1);
        Ok(Bpe {
            arena: arena.into_boxed_slice(),
            offsets: offsets.into_boxed_slice(),
            slots: slots.into_boxed_slice(),
            mask,
            longest,
            regex,
            id,
        })
    }

    #[inline]
    fn token(&self, rank: Rank) -> &[u8] {
        let r = rank as usize;
        &self.arena[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// The rank of the token whose bytes are `bytes`, if there is one.
    #[inline]
    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let mut i = hash(bytes) & self.mask;
        loop {
            let r = self.slots[i];
            if r == NONE {
                return None;
            }
            if self.token(r) == bytes {
                return Some(r);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    fn rank_or_none(&self, bytes: &[u8]) -> Rank {
        self.rank(bytes).unwrap_or(NONE)
    }

    fn with_regex<T>(&self, f: impl FnOnce(&Splitter) -> T) -> T {
        REGEXES.with(|cell| {
            let mut v = cell.borrow_mut();
            if v.len() <= self.id {
                v.resize_with(self.id + 1, || None);
            }
            let rx = v[self.id].get_or_insert_with(|| self.regex.clone());
            f(rx)
        })
    }

    /// Tokens of `text` encoded as ordinary text (special-token text is not special), as
    /// tiktoken's `encode_ordinary(text).len()`; `Err` when the split regex fails (its
    /// backtrack limit), never a panic.
    pub fn count(&self, text: &str) -> Result<usize, fancy_regex::Error> {
        self.with_regex(|rx| {
            let mut n = 0usize;
            match rx {
                Splitter::Fancy(rx) => {
                    for m in rx.find_iter(text) {
                        n += self.count_piece(m?.as_str().as_bytes());
                    }
                }
                Splitter::Plain(rx) => {
                    let mut pos = 0;
                    while let Some(m) = rx.find_at(text, pos) {
                        let mut end = m.end();
                        if end < text.len() {
                            if let Some(len) = without_last_space(m.as_str()) {
                                end = m.start() + len;
                            }
                        }
                        n += self.count_piece(&text.as_bytes()[m.start()..end]);
                        pos = end;
                    }
                }
            }
            Ok(n)
        })
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        if piece.len() == 1 || self.rank(piece).is_some() {
            return 1;
        }
        if piece.len() < 100 {
            self.merge_small(piece)
        } else {
            self.merge_large(piece)
        }
    }

    /// tiktoken's `_byte_pair_merge`, returning the number of parts.
    fn merge_small(&self, piece: &[u8]) -> usize {
        let mut parts: Vec<(usize, Rank)> = Vec::with_capacity(piece.len() + 1);
        let mut min_rank: (Rank, usize) = (NONE, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.rank_or_none(&piece[i..i + 2]);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, NONE));
        parts.push((piece.len(), NONE));

        let get_rank = |parts: &Vec<(usize, Rank)>, i: usize| {
            if (i + 3) < parts.len() {
                self.rank_or_none(&piece[parts[i].0..parts[i + 3].0])
            } else {
                NONE
            }
        };
        while min_rank.0 != NONE {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, i - 1);
            }
            parts[i].1 = get_rank(&parts, i);
            parts.remove(i + 1);
            min_rank = (NONE, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        parts.len() - 1
    }

    /// tiktoken's `_byte_pair_merge_large` (a heap of candidate merges), returning the number
    /// of parts.
    fn merge_large(&self, piece: &[u8]) -> usize {
        let mut state = Vec::with_capacity(piece.len());
        state.push(State {
            prev: usize::MAX,
            end: 1,
            next_end: 2,
            next_rank: NONE,
        });
        let mut heap = BinaryHeap::with_capacity(piece.len());
        for i in 0..piece.len() - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Merge { start: i, rank });
                state[i].next_rank = rank;
            }
            state.push(State {
                prev: i,
                end: i + 2,
                next_end: i + 3,
                next_rank: NONE,
            });
        }
        let potential_merge = |state: &mut Vec<State>,
                               heap: &mut BinaryHeap<Merge>,
                               start: usize,
                               next_end: usize| {
            state[start].next_end = next_end;
            state[start].next_rank = NONE;
            if next_end <= piece.len() {
                if let Some(rank) = self.rank(&piece[start..next_end]) {
                    heap.push(Merge { start, rank });
                    state[start].next_rank = rank;
                }
            }
        };
        while let Some(left) = heap.pop() {
            if left.rank == NONE {
                break;
            }
            if left.rank != state[left.start].next_rank {
                continue;
            }
            let left_start = left.start;
            let right_start = state[left_start].end;
            let right_end = state[left_start].next_end;
            let right_next_end = state[right_start].next_end;
            state[left_start].end = right_end;
            potential_merge(&mut state, &mut heap, left_start, right_next_end);
            if right_end < state.len() {
                state[right_end].prev = left_start;
            }
            if left_start > 0 {
                let prev_start = state[left_start].prev;
                potential_merge(&mut state, &mut heap, prev_start, right_end);
            }
            state[right_start].next_rank = NONE;
        }
        let mut n = 0;
        let mut i = 0;
        while i < state.len() {
            n += 1;
            i = state[i].end;
        }
        n
    }
}

struct State {
    prev: usize,
    end: usize,
    next_end: usize,
    next_rank: Rank,
}

#[derive(Eq, PartialEq, Clone, Copy)]
struct Merge {
    start: usize,
    rank: Rank,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// cl100k_base's split pattern (tiktoken-rs keeps it inline in `cl100k_base()`).
const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

/// Both vocabularies, built once per process.
pub(crate) struct Vocabularies {
    pub o200k: Bpe,
    pub cl100k: Bpe,
}

static VOCABULARIES: OnceLock<Result<Vocabularies, String>> = OnceLock::new();

/// The packed o200k_base and cl100k_base vocabularies; the first call takes ~0.5 s.
pub(crate) fn vocabularies() -> Result<&'static Vocabularies, &'static str> {
    VOCABULARIES
        .get_or_init(load)
        .as_ref()
        .map_err(String::as_str)
}

type Packed = (Vec<u8>, Vec<u32>);

fn load() -> Result<Vocabularies, String> {
    // tiktoken-rs's encoders are built, decoded rank by rank and dropped on a thread of their
    // own, so their ~60 MB of small allocations live and die in that thread's malloc arena.
    // What it returns is copied here, leaving nothing alive there: the arena is then
    // released to the system instead of pinning the memory for the life of the process.
    let packed = std::thread::Builder::new()
        .name("ctxgate-vocab".into())
        .spawn(|| -> Result<(Packed, Packed), String> {
            let o = tiktoken_rs::o200k_base().map_err(|e| e.to_string())?;
            let po = pack(&o);
            drop(o);
            let c = tiktoken_rs::cl100k_base().map_err(|e| e.to_string())?;
            let pc = pack(&c);
            Ok((po, pc))
        })
        .map_err(|e| format!("cannot start the vocabulary loader: {e}"))?
        .join()
        .map_err(|_| "the vocabulary loader panicked".to_string())??;
    let ((oa, oo), (ca, co)) = packed;
    Ok(Vocabularies {
        o200k: Bpe::from_packed(oa.clone(), oo.clone(), Splitter::o200k()?, 0)?,
        cl100k: Bpe::from_packed(
            ca.clone(),
            co.clone(),
            Splitter::Fancy(fancy_regex::Regex::new(CL100K_PATTERN).map_err(|e| e.to_string())?),
            1,
        )?,
    })
}

/// Every ordinary token of `core`, rank by rank (special tokens left out).
fn pack(core: &tiktoken_rs::CoreBPE) -> Packed {
    let special: HashSet<&[u8]> = core
        .special_tokens()
        .into_iter()
        .map(str::as_bytes)
        .collect();
    let mut arena = Vec::new();
    let mut offsets = vec![0u32];
    // Ranks are dense from 0; a run of 1,000 undecodable ranks ends the vocabulary.
    let mut misses = 0u32;
    let mut rank: Rank = 0;
    while misses < 1000 {
        match core.decode_bytes(&[rank]) {
            Ok(bytes) if !special.contains(bytes.as_slice()) => {
                // Fill the gap (ranks with no token) with empty entries.
                let last = *offsets.last().unwrap_or(&0);
                offsets.resize(rank as usize + 1, last);
                arena.extend_from_slice(&bytes);
                offsets.push(arena.len() as u32);
                misses = 0;
            }
            _ => misses += 1,
        }
        rank += 1;
    }
    (arena, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts() -> Vec<String> {
        let mut texts: Vec<String> = vec![
            String::new(),
            "a".repeat(5000),
            " ".repeat(300),
            "\n\n\n  \t x".into(),
            "héllo wörld 日本語のテキスト 🎉🎉 Ünïcödé".into(),
            "12345678901234 3.14159 don't I'LL we've THEY'RE".into(),
            "<|endoftext|> <|endofprompt|> <|fim_prefix|>".into(),
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n".into(),
        ];
        for f in [
            "tests/fixtures/openai-seed.json",
            "tests/fixtures/anthropic-seed.json",
            "README.md",
            "src/prune/policy.rs",
        ] {
            texts.push(std::fs::read_to_string(f).unwrap());
        }
        // Pseudo-random strings over letters, digits, spaces, newlines, apostrophes,
        // punctuation, accents, CJK and emoji: the classes the split patterns tell apart.
        let alphabet: Vec<char> = "ab xyzAZ09 \n\r\t'’é日本🎉.,;:!?-_()[]{}<>/\\\"\u{a0}"
            .chars()
            .collect();
        // And whitespace-heavy strings: runs of spaces, tabs, no-break and ideographic spaces
        // and line ends before letters, digits and punctuation (o200k's look-ahead case).
        let spaces: Vec<char> = "   \t\t\u{a0}\u{3000}\r\n\n a1.Z".chars().collect();
        // xorshift64: the same strings on every run.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = |alphabet: &[char], len: usize| -> String {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect()
        };
        for i in 0..2000 {
            texts.push(random(&spaces, i % 40));
        }
        for i in 0..2000 {
            texts.push(random(&alphabet, i % 300));
        }
        texts
    }

    #[test]
    fn counts_equal_tiktoken() {
        let v = vocabularies().unwrap();
        let o = tiktoken_rs::o200k_base_singleton();
        let c = tiktoken_rs::cl100k_base_singleton();
        for t in texts() {
            assert_eq!(
                v.o200k.count(&t).unwrap(),
                o.encode_ordinary(&t).len(),
                "o200k: {t:?}"
            );
            assert_eq!(
                v.cl100k.count(&t).unwrap(),
                c.encode_ordinary(&t).len(),
                "cl100k: {t:?}"
            );
        }
    }

    #[test]
    fn long_pieces_take_the_heap_merge() {
        // A 150-byte run with no vocabulary entry of its own goes through `merge_large`.
        let v = vocabularies().unwrap();
        let piece = "qzxv".repeat(40);
        assert!(v.o200k.rank(piece.as_bytes()).is_none());
        assert_eq!(
            v.o200k.count(&piece).unwrap(),
            tiktoken_rs::o200k_base_singleton()
                .encode_ordinary(&piece)
                .len()
        );
    }

    #[test]
    fn every_token_is_found_by_its_bytes() {
        let v = vocabularies().unwrap();
        for bpe in [&v.o200k, &v.cl100k] {
            let n = bpe.offsets.len() - 1;
            let mut found = 0;
            for r in 0..n as Rank {
                let t = bpe.token(r);
                if !t.is_empty() {
                    assert_eq!(bpe.rank(t), Some(r));
                    found += 1;
                }
            }
            assert!(found > 100_000, "{found}");
        }
        assert_eq!(v.o200k.offsets.len() - 1, 199_998);
        assert_eq!(v.cl100k.offsets.len() - 1, 100_256);
    }
}
