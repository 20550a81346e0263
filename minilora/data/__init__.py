"""The shipped corpora, one character vocabulary for all of them, and training windows.

Everything here runs on the CPU with NumPy: it is file I/O and integer bookkeeping, not
computation. Three modules, each one thing:

* :mod:`minilora.data.text`     the 97-symbol ASCII vocabulary, folding text into it, the tokenizer
* :mod:`minilora.data.corpora`  where the shipped corpora live (one rule) and their train/held-out readers
* :mod:`minilora.data.batches`  random LM windows and labelled rows as ``int32`` arrays

The corpora are *data*; which of them make a fine-tuning task, with what metric and recipe, is
decided on the experiments floor (:mod:`minilora.experiments.tasks`).

Chapter: chapters/01-foundations.ipynb
"""
from minilora.data.batches import encode_classification, get_batch, sample_rows
from minilora.data.corpora import (
                                   DataMissingError,
                                   data_dir,
                                   load_lexicon,
                                   load_milton,
                                   load_python_code,
                                   load_sentiment,
                                   load_shakespeare,
)
from minilora.data.text import (
                                   ASCII_VOCAB,
                                   CharTokenizer,
                                   DataError,
                                   encode_corpus,
                                   fold_ascii,
)

__all__ = ["ASCII_VOCAB", "CharTokenizer", "DataError", "DataMissingError", "data_dir",
           "encode_classification", "encode_corpus", "fold_ascii", "get_batch", "load_lexicon",
           "load_milton", "load_python_code", "load_sentiment", "load_shakespeare", "sample_rows"]
