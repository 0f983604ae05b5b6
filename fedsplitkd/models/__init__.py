"""Models as named blocks cut after any block (``SplitModel``): the zoo, GPT, Hugging Face, the teacher."""
