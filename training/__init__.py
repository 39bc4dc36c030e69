"""The paper's experiment: datasets, backbones, the train/eval loop, configs and reports.

Run it as ``python -m training`` (the embedded default) or ``python -m training --config cub
--data-root /data``; ``python -m training --help`` lists every config key. See training/README.md.
"""
