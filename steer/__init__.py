"""steer: find expert neurons in language models and steer models through them."""
