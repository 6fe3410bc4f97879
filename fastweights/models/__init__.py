"""Model glue and Hugging Face integration."""
