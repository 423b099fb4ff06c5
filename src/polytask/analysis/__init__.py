"""Looking into runs: reports of a finished run or a comparison (``report``), inter-task
affinity by lookahead (``affinity``) and the best grouping of tasks (``grouping``); ``html``
holds the building blocks of the self-contained pages.

This layer sits above ``polytask.run``: it reads run folders and trains short runs."""
