"""The course's parameter-efficient fine-tuning methods, each one file implementing one interface (`base.py`)."""
