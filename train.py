"""train.py: a small GPT pretrained within a fixed time budget. The agent edits this file.

The model is a compact modern GPT in the spirit of nanochat: RMSNorm without
weights, rotary position embeddings, QK-norm, a relu^2 MLP, a soft-capped logit
head untied from the token embedding. Matrices are trained with Muon, embeddings
and the head with AdamW. The schedule follows the harness's time budget: the
learning rate decays linearly over the last WARMDOWN_RATIO of the budget.

Contract with the harness (prepare.py): read data only through make_dataloader,
loop until budget.done, call budget.step(tokens) after each optimizer step, and
end with finish(model, budget). The model maps token ids [B, T] to logits
[B, T, vocab] and must stay causal and exportable with torch.export.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, PROFILE, Budget, finish, get_tokenizer, make_dataloader

GPU = PROFILE == "gpu"

# ---------------------------------------------------------------------------
# Hyperparameters (value on the GPU profile if GPU else value on the CPU profile)

DEPTH = 8 if GPU else 2  # transformer blocks
ASPECT_RATIO = 64  # model width = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128 if GPU else 32
MLP_RATIO = 4
SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP)
DEVICE_BATCH_SIZE = 32 if GPU else 8  # sequences per forward pass
TOTAL_BATCH_SIZE = 2**19 if GPU else 2**11  # tokens per optimizer step (gradient accumulation)
MATRIX_LR = 0.04  # Muon
EMBEDDING_LR = 0.3  # AdamW, token embedding
UNEMBEDDING_LR = 0.004  # AdamW, output head
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95
WEIGHT_DECAY = 0.0
WARMUP_RATIO = 0.0  # share of the budget spent warming the learning rate up
WARMDOWN_RATIO = 0.5  # share of the budget spent decaying it
FINAL_LR_FRAC = 0.0  # learning rate at the end, relative to the peak

# ---------------------------------------------------------------------------
# Model


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000.0):
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # [1, T, 1, head_dim/2]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))  # QK-norm
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.attn = Attention(dim, n_head)
        self.mlp = MLP(dim)

    def forward(self, x, cos, sin):
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, depth, dim, n_head, seq_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head) for _ in range(depth))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary_tables(seq_len, dim // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=0.001)
        for block in self.blocks:
            bound = 3**0.5 * block.attn.qkv.weight.size(1) ** -0.5  # uniform with std 1/sqrt(dim)
            for w in (block.attn.qkv.weight, block.mlp.fc.weight):
                nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(block.attn.proj.weight)  # residual branches start as identity
            nn.init.zeros_(block.mlp.proj.weight)

    def forward(self, idx):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = rms_norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(rms_norm(x)).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)


# ---------------------------------------------------------------------------
# Optimizer: Muon (momentum, then orthogonalised updates) for the 2-D matrices


@torch.no_grad()
def orthogonalize(g, steps=5):
    """Newton-Schulz iteration pushing the singular values of g towards 1 (batched, bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update is orthogonalised; same-shape matrices are stacked."""

    def __init__(self, params, lr, momentum=0.95):
        params = sorted(params, key=lambda p: tuple(p.shape))
        groups = [{"params": [p for p in params if p.shape == shape]} for shape in dict.fromkeys(p.shape for p in params)]
        super().__init__(groups, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = torch.stack([p.grad for p in params])
            if "buffer" not in group:
                group["buffer"] = torch.zeros_like(grads)
            buffer = group["buffer"]
            buffer.lerp_(grads, 1 - group["momentum"])
            update = orthogonalize(grads.lerp_(buffer, group["momentum"]))
            scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
            torch._foreach_add_(params, list(update.unbind(0)), alpha=-group["lr"] * scale)


# ---------------------------------------------------------------------------
# Setup

device = torch.device("cuda" if GPU else "cpu")
if GPU:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
vocab_size = get_tokenizer().vocab_size
dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
model = GPT(vocab_size, DEPTH, dim, dim // HEAD_DIM, MAX_SEQ_LEN).to(device)
model.init_weights()
num_params = sum(p.numel() for p in model.parameters())
# 6 flops per parameter and token for the matmuls (embedding lookups are free) plus attention
flops_per_token = 6 * (num_params - model.embed.weight.numel()) + 6 * DEPTH * dim * MAX_SEQ_LEN
print(f"GPT: depth {DEPTH}, width {dim}, {num_params / 1e6:.1f}M parameters, profile {PROFILE}", flush=True)

matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
width_scale = (dim / 768) ** -0.5  # AdamW learning rates were tuned at width 768
adam = torch.optim.AdamW(
    [dict(params=[model.embed.weight], lr=EMBEDDING_LR * width_scale),
     dict(params=[model.head.weight], lr=UNEMBEDDING_LR * width_scale)],
    betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10, weight_decay=WEIGHT_DECAY, fused=GPU,
)
muon = Muon(matrices, lr=MATRIX_LR)
optimizers = [adam, muon]
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]



def train_loss(x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=GPU):
        logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


step_loss = torch.compile(train_loss, dynamic=False) if GPU else train_loss  # one fused graph incl. the loss
grad_accum = max(1, TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * MAX_SEQ_LEN))
loader = make_dataloader(DEVICE_BATCH_SIZE, MAX_SEQ_LEN)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * (1.0 - progress) / WARMDOWN_RATIO


# ---------------------------------------------------------------------------
# Training loop: runs until the harness's budget says stop

budget = Budget()
smooth_loss, t_start = None, time.time()
while not budget.done:
    lr_mult = lr_multiplier(budget.progress)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
    for group in muon.param_groups:  # Muon momentum warms up from 0.85 to 0.95 over 300 steps
        group["momentum"] = 0.85 + 0.1 * min(budget.step_count / 300, 1.0)
    for _ in range(grad_accum):
        x, y = next(loader)
        loss = step_loss(x, y)
        (loss / grad_accum).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    budget.step(tokens=grad_accum * DEVICE_BATCH_SIZE * MAX_SEQ_LEN)
    loss_value = loss.item()
    if not math.isfinite(loss_value) or loss_value > 100:
        raise SystemExit(f"training diverged at step {budget.step_count}: loss {loss_value}")
    smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
    print(f"\rstep {budget.step_count:5d} | loss {smooth_loss:.4f} | lr x{lr_mult:.2f} | "
          f"{100 * budget.progress:5.1f}% of budget | {time.time() - t_start:6.1f}s", end="", flush=True)

finish(model, budget, depth=DEPTH, flops_per_token=flops_per_token)
