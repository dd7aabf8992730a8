"""Infrastructure, not required reading: hardened checkpoint reading and atomic saving (`checkpoint`), the jsonl
readers with file:line errors (`corpus`), the crash-resumable on-disk token store (`store`)."""
