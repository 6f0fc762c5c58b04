import torch

from sapo.generation import HFGenerateSampler, SamplingSettings, cut_after_eos, eos_token_ids_of, left_pad


def test_cut_after_eos():
    assert cut_after_eos([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert cut_after_eos([5, 6], {2}) == [5, 6]
    assert cut_after_eos([9, 5], {2, 9}) == [9]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def contexts_of(tokenizer):
    prompts = ["12+35=", "reverse: abcd", "sort: dcba zz"]
    return [tokenizer(f"<s><|user|>{p}<|assistant|>", add_special_tokens=False)["input_ids"] for p in prompts]


def test_greedy_batch_equals_unbatched_generate(tiny_model, tokenizer):
    contexts = contexts_of(tokenizer)
    eos = eos_token_ids_of(tokenizer, tiny_model)
    sampler = HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=tokenizer.pad_token_id,
                                eos_token_ids=eos)
    batched = sampler.sample(tiny_model, contexts, max_new_tokens=10)
    for context, got in zip(contexts, batched, strict=True):
        ids = torch.tensor([context])
        out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
        assert got == cut_after_eos(out[0, len(context):].tolist(), eos)


def test_sampling_is_seeded_and_varies(tiny_model, tokenizer):
    contexts = contexts_of(tokenizer) * 4
    sampler = HFGenerateSampler(SamplingSettings(temperature=1.0, top_k=0, top_p=1.0),
                                pad_token_id=tokenizer.pad_token_id, eos_token_ids={tokenizer.eos_token_id},
                                batch_size=5)
    torch.manual_seed(3)
    first = sampler.sample(tiny_model, contexts, max_new_tokens=8)
    torch.manual_seed(3)
    second = sampler.sample(tiny_model, contexts, max_new_tokens=8)
    assert first == second
    assert len({tuple(s) for s in first}) > 3  # an untrained model sampled at T=1 does not repeat itself
    assert all(len(s) <= 8 for s in first)
    tiny_model.train()  # the sampler switches to eval for decoding and must restore training mode
    sampler.sample(tiny_model, contexts[:1], max_new_tokens=2)
    assert tiny_model.training
