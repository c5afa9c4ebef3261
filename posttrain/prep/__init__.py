"""Torch-free data preparation, shared by the Airflow worker (the prepare stage) and the Ray jobs:
chat rendering and loss masks, the preference and prompt layouts, packing, the tokenizer's
fingerprint."""
