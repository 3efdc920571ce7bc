//! The usage tap under every chunking: never a panic, and the same figures whether the answer
//! comes in one piece or split at any byte — for each dialect, JSON and SSE.
#![no_main]

use bytes::Bytes;
use ctxgate::dialect::{Dialect, UsageTap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses][first as usize % 3];
    let sse = first & 0x80 != 0;
    let text = first & 0x40 != 0;
    let run = |cuts: &[usize]| {
        let mut t = UsageTap::new(dialect.wire(), sse, text);
        let mut at = 0;
        for &c in cuts {
            let c = c.min(body.len()).max(at);
            t.feed(&Bytes::copy_from_slice(&body[at..c]));
            at = c;
        }
        t.feed(&Bytes::copy_from_slice(&body[at..]));
        t.finish()
    };
    let whole = run(&[]);
    let step = usize::from(first % 13) + 1;
    let cuts: Vec<usize> = (0..body.len()).step_by(step).collect();
    assert_eq!(run(&cuts), whole, "split every {step} bytes");
    assert_eq!(run(&[body.len() / 2]), whole, "split in half");
});
