"""Operating Flower: process helpers, `braing3n simulate`, the deployment wrappers, consortium keys, signed releases."""
