"""Adapters as pytrees beside the base: `lora` (config, init, merge), `bank` (many adapters, one per row),
`transpeft` (the Trans-PEFT training recipe) and `moves` (the pure math of moving an adapter to another base)."""
