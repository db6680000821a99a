"""Schemathesis hooks of test_schemathesis_and_soak.py, which its CLI loads by path (SCHEMATHESIS_HOOKS).

before_call: a generated body may ask for hundreds of tokens (chat's default is what the context
leaves), each taking a CPU seconds; the run is about the API's answers, not generation, so a valid
token count above MAX_TOKENS is cut to it and a missing one set to it. Everything else, wrong types
and out-of-range values included, reaches the server as generated.

after_call: each answer's status code, one per line, appended to the file $JPAGED_SCHEMATHESIS_STATUSES,
for the test's figures.
"""

from __future__ import annotations

import os

import schemathesis

MAX_TOKENS = 2
# The field that caps generation, by operation path; None: the operation's default is small (16).
_CAPS = {"/v1/chat/completions": "max_completion_tokens", "/v1/responses": "max_output_tokens",
         "/v1/completions": None}
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@schemathesis.hook
def before_call(context, case, kwargs):
    body, path = case.body, case.operation.path
    if path not in _CAPS or not isinstance(body, dict):
        return
    for field in _TOKEN_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    cap = _CAPS[path]
    if cap is not None and all(body.get(field) is None for field in _TOKEN_FIELDS):
        body[cap] = MAX_TOKENS


@schemathesis.hook
def after_call(context, case, response):
    with open(os.environ["JPAGED_SCHEMATHESIS_STATUSES"], "a") as f:
        f.write(f"{response.status_code}\n")
