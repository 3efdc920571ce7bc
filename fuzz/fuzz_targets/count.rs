//! The packed token counter against tiktoken-rs on short texts: the same count, both
//! vocabularies (texts longer than the pieces the counter splits are not compared: there it
//! counts in pieces on purpose).
#![no_main]

use std::sync::OnceLock;

use ctxgate::prune::{Counter, Encoding};
use libfuzzer_sys::fuzz_target;

fn counter() -> &'static Counter {
    static C: OnceLock<Counter> = OnceLock::new();
    C.get_or_init(|| Counter::new(Encoding::O200kBase).expect("counter"))
}

fn reference() -> &'static (tiktoken_rs::CoreBPE, tiktoken_rs::CoreBPE) {
    static R: OnceLock<(tiktoken_rs::CoreBPE, tiktoken_rs::CoreBPE)> = OnceLock::new();
    R.get_or_init(|| {
        (
            tiktoken_rs::o200k_base().expect("o200k"),
            tiktoken_rs::cl100k_base().expect("cl100k"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > 256 {
        return;
    }
    let (o200k, cl100k) = reference();
    for (enc, bpe) in [(Encoding::O200kBase, o200k), (Encoding::Cl100kBase, cl100k)] {
        let want = bpe.encode_ordinary(text).len() as u64;
        assert_eq!(counter().count_text(enc, text), want, "{enc:?} {text:?}");
    }
});
