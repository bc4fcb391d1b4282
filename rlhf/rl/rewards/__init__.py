"""Rewards for RLHF: the frozen reward source named by ``PPOConfig.reward``, scoring batches of rollouts.

A reward source scores a batch: ``score(prompts, responses, timeout_s)`` returns one finite float per
(prompt, response) pair, in order (:class:`RewardSource`). :func:`make_reward` builds one from the
config string, by its form:

===============================  =======================  ===========================================
``reward``                       source                   scores by
===============================  =======================  ===========================================
``http://...`` / ``https://...``  :class:`HTTPReward`      POSTing the batch to a reward endpoint
an existing directory            :class:`ModelReward`     a reward model written by ``rlhf rm``
``package.module:function``      :class:`FunctionReward`  calling a Python function in this process
===============================  =======================  ===========================================

**Prompts and responses.** A prompt is what the prompt dataset holds (:data:`~rlhf.data.formats.Text`):
a string for plain prompts, a list of ``{"role", "content"}`` messages for conversational ones (not the
policy's rendering of them, so that a reward model renders a conversation with its own chat template).
A response is the generated text, a string without the stop token.

**Columns.** A prompt row's other columns (an ``answer``, a ``solution``, ``metadata``: whatever the data
holds besides the prompt) come with the batch as ``columns``, name -> one value per pair.

**Functions** are called by their signature, read once when the source is built:

* by name, when a parameter is named ``response``: ``f(response, answer)``, ``f(prompt, response,
  answer, metadata=None)``: ``response`` (and ``prompt``) by name, every other parameter from the
  column of that name (a required one the data lacks is an error naming it);
* ``f(response) -> number`` / ``f(prompt, response) -> number`` with other names: by position, one or
  two required parameters; optional parameters named like a column get it;
* batched, ``f(prompts, responses, answer) -> sequence of numbers`` (one per response, in order): a
  function with a parameter named ``prompts`` or ``responses`` gets those it names, and the columns
  it names as lists aligned with the batch (TRL's convention), once per batch.

A function that takes ``**kwargs`` gets every column (and a batched one both ``prompts`` and
``responses``). A number is any real number (``bool`` counts as 0 or 1; numpy scalars and arrays
work); it must be finite. A function runs in the calling thread, so ``timeout_s`` is not enforced on
it here: Python cannot interrupt a function safely, and running it in another thread would break
reward functions that use ``signal``-based timeouts (e.g. math-verify). RLHF runs rewards in Ray
actors, whose calls have a deadline (``reward_timeout_s``).

**Several sources** sum with weights (:class:`WeightedReward`, ``PPOConfig.rewards``); each
component's own rewards are kept by name for the logs.

**HTTP protocol.** ``POST <url>`` with the JSON body ``{"prompts": [...], "responses": [...]}``
(prompts as above: strings or message lists), plus ``"columns": {name: [...]}`` when the prompt rows
have other columns; a 2xx answer with the JSON body
``{"rewards": [number, ...]}``, one finite number per response, in order. Each call gets one request
and answers within ``timeout_s``: an endpoint that is down, one that is slow, a non-2xx status (the
error quotes the start of the body), a body that is not that JSON or is larger than 8 MiB
(:data:`MAX_RESPONSE_BYTES`), or a wrong number of rewards, each raise :class:`RewardError`
(:class:`RewardTimeoutError`, also a ``TimeoutError``, for the slow ones). A call given up at its
deadline closes its connection rather than reading on. Errors show the URL without its
``user:password@`` and query.

**Reward models** are scored exactly as ``rlhf rm`` trained them: each (prompt, response) is encoded
like a preference example's chosen side (:func:`rlhf.data.encode.encode_sft`: for a plain prompt
``tokenizer(prompt)`` with the tokenizer's special tokens, then the response's tokens, then EOS; for a
conversation, the reward model's chat template over the prompt plus one assistant turn), right-padded,
and the scalar head is read at the last non-pad token. A sequence longer than ``max_length`` loses
response tokens from the end, as in training. The model is local, so ``timeout_s`` is not enforced.

Every error names the config key ``reward`` when the spec itself is wrong, and the source (function,
URL or directory) and the row when scoring fails. Build a source where it is used (``make_reward(spec)``
inside the actor that scores): the spec string is what travels, an HTTP client or a model does not.
"""

from __future__ import annotations

from rlhf.rl.rewards.base import (
    DEFAULT_TIMEOUT_S,
    FORMS,
    MAX_RESPONSE_BYTES,
    RewardError,
    RewardSource,
    RewardTimeoutError,
)
from rlhf.rl.rewards.function import Calling, CallingForm, FunctionReward, calling_form, import_function
from rlhf.rl.rewards.http import HTTPReward
from rlhf.rl.rewards.model import ModelReward, reward_model_config
from rlhf.rl.rewards.spec import RewardSpec, make_reward, make_weighted, parse_reward, term_name
from rlhf.rl.rewards.weighted import WeightedReward

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "FORMS",
    "MAX_RESPONSE_BYTES",
    "Calling",
    "CallingForm",
    "FunctionReward",
    "HTTPReward",
    "ModelReward",
    "RewardError",
    "RewardSource",
    "RewardSpec",
    "RewardTimeoutError",
    "WeightedReward",
    "calling_form",
    "import_function",
    "make_reward",
    "make_weighted",
    "parse_reward",
    "reward_model_config",
    "term_name",
]
