"""The evaluation stage: scoring generated answers against gold ones (more evaluators join later)."""
