# The alignment designs compared by experiments/alignment/run.sh and experiments/context/run.sh:
# Hydra overrides per arm, every signal set in every arm (the demo recipe itself turns the chosen
# ones on). Sourced, not run.
# shellcheck disable=SC2034
declare -A ARMS=(
  [A_baseline]="++model.overrides.time_rope=null ++model.overrides.target_embedding=false ++model.overrides.target_last=false ++model.overrides.fill_program=false data.sequences.all_tracks_ratio=0.0"
  [B_bar_flag]="++model.overrides.time_rope=bar ++model.overrides.time_rope_theta=100 ++model.overrides.target_embedding=true ++model.overrides.target_last=false ++model.overrides.fill_program=false data.sequences.all_tracks_ratio=0.0"
  [C_onset_flag]="++model.overrides.time_rope=onset ++model.overrides.target_embedding=true ++model.overrides.target_last=false ++model.overrides.fill_program=false data.sequences.all_tracks_ratio=0.0"
  [D_onset_flag_all_tracks]="++model.overrides.time_rope=onset ++model.overrides.target_embedding=true ++model.overrides.target_last=false ++model.overrides.fill_program=false data.sequences.all_tracks_ratio=0.5"
  [E_onset_flag_program]="++model.overrides.time_rope=onset ++model.overrides.target_embedding=true ++model.overrides.target_last=false ++model.overrides.fill_program=true data.sequences.all_tracks_ratio=0.0"
  [F_onset_flag_program_all_tracks]="++model.overrides.time_rope=onset ++model.overrides.target_embedding=true ++model.overrides.target_last=false ++model.overrides.fill_program=true data.sequences.all_tracks_ratio=0.5"
  [G_onset_flag_program_all_tracks_target_last]="++model.overrides.time_rope=onset ++model.overrides.target_embedding=true ++model.overrides.fill_program=true ++model.overrides.target_last=true data.sequences.all_tracks_ratio=0.5"
)
