"""The training scripts (pretrain.py, finetune.py: the course's chapter 6) and what they share, one file per concern:
args.py (arguments, their checks, the default learning rates), models.py (tokenizer and model, --impl),
run.py (logging, output directory, run.json, resume), trainer.py (the Trainer, saving, the scripts' ending),
caches.py (data files and the preprocessed-data cache), plots.py (loss.png), safety.py (what protects the user),
peft_methods.py (--peft). Tools around them: compare.py, demo.py, doctor.py, lr_curves.py, reference_curves.py."""
