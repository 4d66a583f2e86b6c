"""One run on several processes: the ``distributed:`` params, launching the workers, and what each
strategy (DDP, FSDP2, DeepSpeed ZeRO) needs to train and save correctly."""
