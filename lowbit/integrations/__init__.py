"""lowbit inside the tools users already run: Flower (:mod:`lowbit.integrations.flower`) and the
Hugging Face Trainer (:mod:`lowbit.integrations.hf`). Each needs its optional extra."""
