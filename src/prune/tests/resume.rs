//! Parsing a body after its conversation's previous one (`ChatRequest::parse_after`) gives
//! exactly what a full parse gives — the same fields, messages, facts and hashes — whatever
//! changed between the two bodies; and it parses only the new part when the body repeats the
//! previous one and adds to it.

use std::sync::Arc;

use super::*;

fn layout_of(dialect: Dialect, body: &[u8]) -> Arc<Layout> {
    ChatRequest::parse(dialect, body).unwrap().layout().unwrap()
}

fn after(dialect: Dialect, prev: &[u8], body: &[u8]) -> Result<ChatRequest, ParseError> {
    ChatRequest::parse_after(
        dialect,
        bytes::Bytes::copy_from_slice(body),
        &layout_of(dialect, prev),
    )
}

fn turns(n: usize) -> Vec<GenTurn> {
    (0..n)
        .map(|t| GenTurn {
            user_words: 3 + t % 4,
            user_file_lines: if t % 3 == 0 { 25 } else { 0 },
            steps: vec![(1 + t % 2, 4 + t), (1, 2)],
            answer_words: 5,
            system_note: t % 2 == 1,
        })
        .collect()
}

const DIALECTS: [Dialect; 3] = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses];

/// The body checked as it arrives, in pieces of any size, finds what one pass finds.
#[test]
fn a_body_checked_frame_by_frame_finds_the_same_prefix() {
    let dialect = Dialect::Anthropic;
    let ts = turns(6);
    let prev = render_with_note(&ts[..4], dialect, false, false);
    let body = render_with_note(&ts, dialect, false, false);
    let layout = layout_of(dialect, &prev);
    let whole = {
        let mut v = layout.verifier();
        v.feed(&body);
        v.finish().1
    };
    let known = ChatRequest::parse(dialect, &prev).unwrap().message_count();
    assert_eq!(whole, Some(known));
    for size in [1, 7, 64, 1000, 4096, body.len()] {
        let mut v = layout.verifier();
        for piece in body.chunks(size) {
            v.feed(piece);
        }
        assert!(v.fresh_bytes(body.len()) < body.len() / 2);
        let r = ChatRequest::parse_resumed(dialect, bytes::Bytes::from(body.clone()), v).unwrap();
        assert_eq!(
            r.parts(),
            ChatRequest::parse(dialect, &body).unwrap().parts()
        );
        assert_eq!(r.reused_messages(), known, "pieces of {size}");
    }
    // A body that stops inside the head, or differs in it, matches nothing.
    let mut v = layout.verifier();
    v.feed(&body[..5]);
    assert_eq!(v.finish().1, None);
    let mut other = body.clone();
    other[3] ^= 1;
    let mut v = layout.verifier();
    v.feed(&other);
    assert_eq!(v.finish().1, None);
}

#[test]
fn a_grown_body_parses_only_its_new_turn() {
    for dialect in DIALECTS {
        let ts = turns(6);
        let prev = render_with_note(&ts[..5], dialect, false, false);
        let body = render_with_note(&ts, dialect, false, false);
        let known = ChatRequest::parse(dialect, &prev).unwrap().message_count();
        let r = after(dialect, &prev, &body).unwrap();
        let full = ChatRequest::parse(dialect, &body).unwrap();
        assert_eq!(r.parts(), full.parts(), "{dialect:?}");
        assert_eq!(r.reused_messages(), known, "{dialect:?}");
        assert!(r.message_count() > known);
        // Only the new turn and the fields after the messages were left to parse.
        let tail_at = full.messages()[known - 1].end;
        assert_eq!(r.fresh_bytes(), body.len() - tail_at);
        assert!(r.fresh_bytes() * 3 < body.len(), "{dialect:?}");
    }
}

#[test]
fn what_changed_before_the_new_turn_is_parsed_again() {
    let dialect = Dialect::OpenAi;
    let ts = turns(5);
    let prev: Value =
        serde_json::from_slice(&render_with_note(&ts[..4], dialect, false, false)).unwrap();
    let grown: Value =
        serde_json::from_slice(&render_with_note(&ts, dialect, false, false)).unwrap();
    let n_prev = prev["messages"].as_array().unwrap().len();
    let prev_bytes = prev.to_string().into_bytes();
    let check = |body: &Value, reused: usize| {
        let b = body.to_string().into_bytes();
        let r = after(dialect, &prev_bytes, &b).unwrap();
        assert_eq!(r.parts(), ChatRequest::parse(dialect, &b).unwrap().parts());
        assert_eq!(r.reused_messages(), reused);
    };
    // An edited history: everything from the edit on is parsed.
    let mut edited = grown.clone();
    edited["messages"][3]["content"] = json!("an edited message");
    check(&edited, 3);
    // A different system prompt (the first message): nothing is taken from the layout.
    let mut system = grown.clone();
    system["messages"][0]["content"] = json!("You are a different agent.");
    check(&system, 0);
    // A field before the messages changed: the top level is parsed again.
    let mut model = grown.clone();
    model["temperature"] = json!(0.9);
    check(&model, 0);
    // A field after the messages changed: the messages are still reused.
    let mut tail = grown.clone();
    tail["zz_unknown"] = json!("changed");
    check(&tail, n_prev);
    // The client dropped the history's tail (its own compaction): what is left is reused.
    let mut shorter = prev.clone();
    shorter["messages"]
        .as_array_mut()
        .unwrap()
        .truncate(n_prev - 2);
    check(&shorter, n_prev - 2);
    // The last message of the previous body changed (Claude Code moves its cache_control
    // marker to the newest message every turn).
    let mut marker = grown.clone();
    marker["messages"][n_prev - 1]["cache_control"] = json!({"type": "ephemeral"});
    check(&marker, n_prev - 1);
}

#[test]
fn a_bad_tail_gives_the_full_parse_error() {
    let dialect = Dialect::OpenAi;
    let ts = turns(3);
    let prev = render_with_note(&ts[..2], dialect, false, false);
    let body = render_with_note(&ts, dialect, false, false);
    let cut = |b: &[u8], n: usize| b[..b.len() - n].to_vec();
    let mut extra_key = cut(&body, 1);
    extra_key.extend_from_slice(br#","messages":[{"role":"user","content":"again"}]}"#);
    let mut not_object = cut(&body, 1);
    not_object.extend_from_slice(br#","messages":3}"#);
    let mut trailing = body.clone();
    trailing.extend_from_slice(b" x");
    for bad in [cut(&body, 1), cut(&body, 40), trailing, not_object] {
        let full = ChatRequest::parse(dialect, &bad).map(|r| r.parts());
        let r = after(dialect, &prev, &bad).map(|r| r.parts());
        assert_eq!(format!("{r:?}"), format!("{full:?}"));
        assert!(r.is_err());
    }
    // The items key again after the messages: the last one counts, as in a full parse.
    let full = ChatRequest::parse(dialect, &extra_key).unwrap();
    let r = after(dialect, &prev, &extra_key).unwrap();
    assert_eq!(r.parts(), full.parts());
    assert_eq!(r.message_count(), 1);
    assert_eq!(r.reused_messages(), 0);
}

#[test]
fn pruning_after_a_resumed_parse_forwards_what_a_full_parse_forwards() {
    let budget = Budget {
        hard_token_limit: 3000,
        target_tokens: 1800,
        max_messages: 0,
        keep_file_content_turns: 1,
        min_file_lines: 20,
        ..Budget::default()
    };
    let c = counter();
    for dialect in DIALECTS {
        let (resumed, full) = (view(), view());
        let ts = turns(24);
        let mut moved = 0;
        let mut prev_len = 0;
        for t in 1..=ts.len() {
            let mut body = render_with_note(&ts[..t], dialect, false, false);
            if t == 12 {
                // An edited history and a changed system prompt mid-conversation.
                let mut v: Value = serde_json::from_slice(&body).unwrap();
                let key = dialect.items_key();
                v[key][1]["content"] = json!("an edited first message");
                body = v.to_string().into_bytes();
            }
            let a = match resumed.layout("c") {
                Some(l) => ChatRequest::parse_after(dialect, bytes::Bytes::from(body.clone()), &l),
                None => ChatRequest::parse(dialect, &body),
            }
            .unwrap();
            let b = ChatRequest::parse(dialect, &body).unwrap();
            assert_eq!(a.parts(), b.parts());
            if t > 1 && t != 12 && t != 13 && prev_len >= super::super::policy::LAYOUT_MIN_BYTES {
                assert!(a.reused_messages() > 0, "{dialect:?} turn {t}");
            }
            prev_len = body.len();
            let oa = prune(&a, &budget, &resumed, "c", &c);
            let ob = prune(&b, &budget, &full, "c", &c);
            assert_eq!(oa, ob, "{dialect:?} turn {t}");
            moved += usize::from(oa.summary().is_some_and(|s| s.cut_moved));
        }
        assert!(
            moved >= 2,
            "{dialect:?}: the conversation outgrew the limit"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn parse_after_equals_a_full_parse(
        turns in prop::collection::vec(gen_turn(), 1..6),
        dialect in prop_oneof![Just(Dialect::OpenAi), Just(Dialect::Anthropic), Just(Dialect::Responses)],
        keep in 0.0f64..1.0,
        change in 0usize..7,
        at in 0.0f64..1.0,
        pretty in any::<bool>(),
    ) {
        let key = dialect.items_key();
        let full: Value = serde_json::from_slice(&render_with_note(&turns, dialect, false, false)).unwrap();
        let n = full[key].as_array().unwrap().len();
        let m = ((n as f64 * keep) as usize).clamp(1, n);
        let mut prev = full.clone();
        prev[key].as_array_mut().unwrap().truncate(m);
        let mut body = full.clone();
        let i = ((n as f64 * at) as usize).min(n - 1);
        match change {
            1 => body[key][i] = json!({"role": "user", "content": format!("edited {i}")}),
            2 => body["temperature"] = json!(0.25),
            3 => body["zz_unknown"] = json!({"keep": "changed"}),
            4 => body[key].as_array_mut().unwrap().truncate(i + 1),
            5 => body[key][i]["extra"] = json!("é ünïcode \u{1F600} \"quoted\""),
            _ => {}
        }
        let render = |v: &Value| if pretty { serde_json::to_vec_pretty(v).unwrap() } else { serde_json::to_vec(v).unwrap() };
        let (prev, mut body) = (render(&prev), render(&body));
        if change == 6 {
            body.truncate(body.len() * 9 / 10);
        }
        let expect = ChatRequest::parse(dialect, &body).map(|r| r.parts());
        let got = after(dialect, &prev, &body);
        if change == 0 {
            prop_assert_eq!(got.as_ref().map(|r| r.reused_messages()).ok(), Some(m));
        }
        prop_assert_eq!(format!("{:?}", got.map(|r| r.parts())), format!("{:?}", expect));
    }
}

/// JSON lets a key repeat and the last one counts: an earlier copy of the items key goes out
/// as an empty array, so a pruned body is still JSON (found by the `prune` fuzz target).
#[test]
fn a_repeated_items_key_goes_out_as_an_empty_array() {
    let big = "line of output\n".repeat(400);
    let body = serde_json::to_string(&json!({"model": "gpt-4o", "messages": "x"})).unwrap();
    let tail = serde_json::to_string(&json!([
        {"role": "user", "content": big},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]))
    .unwrap();
    let body = format!("{},\"messages\":{tail}}}", &body[..body.len() - 1]);
    let req = ChatRequest::parse(Dialect::OpenAi, body.as_bytes()).unwrap();
    let budget = Budget {
        hard_token_limit: 500,
        target_tokens: 300,
        max_messages: 0,
        ..Budget::default()
    };
    let Outcome::Pruned { body: pruned, .. } = prune(&req, &budget, &view(), "c", &counter())
    else {
        panic!("pruned");
    };
    let text = String::from_utf8(pruned).unwrap();
    assert!(
        text.starts_with(r#"{"model":"gpt-4o","messages":[],"messages":[{"#),
        "{text}"
    );
    assert_eq!(
        ChatRequest::parse(Dialect::OpenAi, text.as_bytes())
            .unwrap()
            .message_count(),
        2
    );
}
