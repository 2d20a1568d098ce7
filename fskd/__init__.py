"""fskd: few-shot image classification with knowledge transferred from vision-language models."""

__version__ = "0.1.0"
