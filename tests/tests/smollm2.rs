//! The second test model, SmolLM2 135M Instruct Q4_1 (llama architecture, ChatML template),
//! runs through the CLI, so tests that need two different models can count on it.

use llama_tests::{assert_exit, llama, smollm2_model_path, stdout};

#[test]
fn smollm2_answers_a_chat_turn_the_same_way_twice() {
    let model = smollm2_model_path();
    let args = ["run", "-m", model.to_str().unwrap(), "--chat", "-p", "Hi", "-n", "16", "--temp", "0", "-t", "2"];
    let first = llama(&args);
    assert_exit(&first, 0);
    assert!(!stdout(&first).trim().is_empty(), "no text from SmolLM2");
    let second = llama(&args);
    assert_exit(&second, 0);
    assert_eq!(stdout(&first), stdout(&second), "greedy generation differs between runs");
}
