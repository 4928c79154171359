"""Posterior-sampling DQN: explores from ``p(a|s) exp(Q(s,a)/T)`` over the admissible actions."""
