//! Attention past the boundary of a span part (`attention::SPAN_PART`: a
//! span is attended in parts and merged): a prompt's logits from one batched
//! pass, whose rows split their spans into one or two parts, against the same
//! positions decoded one token at a time, for the f16 and the q8_0 cache:
//! the same bits (a row's arithmetic does not depend on the rows beside it,
//! and the split on the span alone).

mod common;

use common::*;
use minnow_engine::kv_cache::{CacheTypes, KvCache, KvType};
use minnow_engine::model::{Logits, Model};
use minnow_kernels::attention::SPAN_PART;

fn smollm2() -> &'static Model {
    load_once(MODELS[0].1, || open_model_file(MODELS[0].1))
}

fn prefill_then_decode_agree(types: CacheTypes) {
    let m = smollm2();
    let vocab = m.config().vocab_size;
    // Arbitrary but fixed tokens (as `minnow bench` uses), past one part.
    let n = SPAN_PART + 40;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let mut one_pass = KvCache::new(m.config(), n, types);
    let all = m.forward_one(pool(), &mut one_pass, &ids, Logits::All).unwrap();

    let start = SPAN_PART - 20;
    let mut stepwise = KvCache::new(m.config(), n, types);
    m.forward_one(pool(), &mut stepwise, &ids[..start], Logits::None).unwrap();
    for j in start..n {
        let step = m.forward_one(pool(), &mut stepwise, &ids[j..=j], Logits::Last).unwrap();
        let batch = &all[j * vocab..(j + 1) * vocab];
        let differ = step.iter().zip(batch).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{types:?}: position {j}: {differ} logits differ from the batched pass");
    }
}

#[test]
fn prefill_and_decode_agree_across_span_parts_f16() {
    prefill_then_decode_agree(CacheTypes::default());
}

#[test]
fn prefill_and_decode_agree_across_span_parts_q8_0() {
    prefill_then_decode_agree(CacheTypes { k: KvType::Q8_0, v: KvType::Q8_0 });
}
