"""Tasks: what a model's training loss and a query's measurement are (:mod:`infkit.tasks.base`), for text models
(:mod:`infkit.tasks.text`) and diffusers UNets (:mod:`infkit.tasks.diffusion`)."""

from infkit.tasks.base import IGNORE_INDEX, ExampleError, Labels, Task
from infkit.tasks.diffusion import Diffusion
from infkit.tasks.text import CausalLM, Classification

__all__ = ["IGNORE_INDEX", "CausalLM", "Classification", "Diffusion", "ExampleError", "Labels", "Task"]
