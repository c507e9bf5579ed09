"""The data wing: audio -> LMS files, lists, labels, weights and norm stats (prepare), packed shards
(pack), and the dataset the trainer reads. Names in a data folder come from m2das.datafolder."""
