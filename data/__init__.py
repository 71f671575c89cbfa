"""vlt.data: WebDataset shard writers and readers, ChatML tokenisation, packing, synthetic sets.

Modules: ``tokenizer`` (ByteTokenizer, load_tokenizer, apply_chat_template, build_prompt_ids),
``image`` (ImageProcessor, smart_resize), ``synthetic`` (make_sample), ``shards`` (writers, pack),
``pipeline`` (reader, packing, collate), ``datamodule`` (VLTDataModule), ``cli``, ``bench``,
``inspect``. Nothing here imports the model code. Imports are per module to keep ``vlt`` light.
"""
