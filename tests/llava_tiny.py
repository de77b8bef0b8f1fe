"""A tiny LlavaForConditionalGeneration (random weights, GQA) and prompts for it, shared by the vision tests."""

from __future__ import annotations

import torch

IMAGE_ID, PAD = 60, 0
N_VIS = 16  # 16 x 16 image in 4 x 4 patches


def make_tiny_llava(directory, layers: int = 3, seed: int = 0):
    """Build, save to ``directory`` and reload (as users load models) a tiny LLaVA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, pad_token_id=PAD)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", image_seq_length=N_VIS)
    m = LlavaForConditionalGeneration(cfg)
    m.save_pretrained(directory)
    return LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa").eval()


def batch(question_lengths=(5, 3, 7), seed=1):
    """Left-padded prompts ``<bos><image>x16 question`` with random question tokens and images."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1] + [IMAGE_ID] * N_VIS + torch.randint(2, 59, (q,), generator=g).tolist() for q in question_lengths]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    pix = torch.randn((len(rows), 3, 16, 16), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                              return_dict_in_generate=True, output_scores=True)
