"""Training stages (pretrain, sft, grpo, distill) over one shared loop (`nanoseek.train.loop`)."""
