"""The model as data: its config (`config`), the partition table that says what each rank of
each layout holds (`layouts`), and the tensor-name tables between formats (`names`)."""
