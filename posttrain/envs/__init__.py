"""Multi-turn environments: what answers the policy between its turns (tool results, user replies) and rewards it.

`base` holds the protocol and the registry, `tools` the built-in tools and the environment that runs them,
`trajectory` the token-in, token-out rollout of several turns over any rollout engine.
"""
