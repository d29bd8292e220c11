"""Image sources -> WebDataset tar shards + parquet manifest; the streaming reader; verification.

    sources.py     ImageNet layout, class folders, Fashion-MNIST (Debian), demo crops of bundled photos
    images.py      decode once, convert odd modes to 8-bit RGB/grey, optional resize; reject broken files
    plan.py        which sample goes to which shard, fixed up front (seeded, class-mixed)
    layout.py      what a sample looks like in a tar (members, fixed headers)
    write.py       deterministic, atomic, resumable shard writing (any subset of shard indices)
    fanout.py      the same as Ray tasks over disjoint shard ranges (`cscctrl shard --ray`, the workflow)
    ensure.py      ensure_shards: a plan's shards written once, reused after (demo shards, workflow stages)
    storage.py     local paths and fsspec URLs (s3://, gs://, memory://) with atomic writes
    manifest.py    parquet tables + manifest.json; read_manifest(url) -> Manifest
    verify.py      re-read shards against the manifest
    transforms.py  centre crop, resize, flip, [−1, 1], dequantisation noise
    stream.py      make_train_loader (resampled, steps per epoch) / make_eval_loader (exact)
    cli_shard.py, cli_verify.py   `cscctrl shard` and `cscctrl verify`

Nothing here imports models/, pipeline/ or tuning/.
"""
