"""The experiments floor: everything that uses the library to run, record and draw.

* :mod:`~minilora.experiments.tasks`    the fine-tuning tasks (corpus, metric, recipe): ``TASKS``
* :mod:`~minilora.experiments.methods`  the fine-tuning methods (setup functions): ``METHODS``
* :mod:`~minilora.experiments.presets`  model sizes for pre-training and the bench: ``PRESETS``
* :mod:`~minilora.experiments.finetune` the harness: any method on any task, like for like
* :mod:`~minilora.experiments.results_table`  ``minilora results``: the table of saved runs
* :mod:`~minilora.experiments.scoring`  several adapters scored in one mixed batch
* :mod:`~minilora.experiments.studies`  one module per study (claim, LoftQ, quant comparison, paging)
* :mod:`~minilora.experiments.figures`  every figure, drawn from ``results/`` only: ``FIGURES``
* :mod:`~minilora.experiments.paths`    the shipped base model, ``results/``, ``figures/``, ``runs/``
* :mod:`~minilora.experiments.tour`, :mod:`~minilora.experiments.notebooks`  the tour; chapter running

Nothing in the library (``minilora.nn``, ``minilora.methods.lora``, ...) imports from here.
"""
